//! Loop devices for `file` pool volumes, through `losetup` (JSON output): attach a backing file
//! (reusing an existing attachment), find the devices of a file, refresh capacity, detach.
