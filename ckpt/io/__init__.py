"""Where bytes go and how they get there: the storage protocol and its backends (storage.py: local; s3.py:
object storage), the run directory's lock (lock.py: flock; lease.py: a lock object with a lease on S3),
reusable staging buffers for async saves, and the plain threads the save and load paths run on."""
