//! Filesystems on block devices: probe for signatures with `blkid`, create with `mkfs.*` only on
//! a blank device, grow online, give a copy a new UUID.

/// Filesystems holdfast creates on block devices.
pub const SUPPORTED_FS: [&str; 3] = ["ext4", "xfs", "btrfs"];
