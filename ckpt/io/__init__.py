"""Where bytes go and how they get there: the storage protocol and its backends, the run directory's lock,
reusable staging buffers for async saves, and the plain threads the save and load paths run on."""
