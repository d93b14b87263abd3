//! The `file` pool: each volume is a sparse file in the pool directory with a JSON metadata file
//! beside it; the node attaches it to a loop device.
