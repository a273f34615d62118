"""What a checkpoint is on disk: the manifest (the commit marker and the record of every file), tensor files
in the safetensors layout, msgpack value files (plain data only, no pickle), and the names of folders and
files in a run directory. Nothing here talks to other ranks or decides who writes what."""
