//! The block-device ioctls the backend needs and no crate it uses wraps: the size of a block
//! device and a discard of its whole range. This module holds the crate's only `unsafe` code.

use std::io;

use rustix::fd::AsFd;
use rustix::ioctl::{opcode, Getter, Setter};

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`: the device's size in bytes.
const BLKGETSIZE64: rustix::ioctl::Opcode = opcode::read::<u64>(0x12, 114);

/// `BLKDISCARD` = `_IO(0x12, 119)`, taking `uint64_t[2]` (offset, length) in bytes.
const BLKDISCARD: rustix::ioctl::Opcode = opcode::none(0x12, 119);

/// The size in bytes of the open block device `dev`.
pub fn block_size_bytes<Fd: AsFd>(dev: Fd) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes one u64 (size_t on 64-bit Linux, the only target strata
    // builds for) into the Getter's buffer; any bit pattern is a valid u64.
    let size = unsafe { rustix::ioctl::ioctl(&dev, Getter::<{ BLKGETSIZE64 }, u64>::new())? };
    Ok(size)
}

/// Discards bytes `[offset, offset + len)` of the open block device `dev`: a thin device gives
/// the blocks back to its pool, which passes the discard down (a loop-backed pool punches a
/// hole in its data file).
pub fn discard<Fd: AsFd>(dev: Fd, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads a `uint64_t[2]` through the pointer the Setter passes, which
    // points at `range`, alive and unaliased for the call.
    unsafe {
        rustix::ioctl::ioctl(&dev, Setter::<{ BLKDISCARD }, [u64; 2]>::new(range))?;
    }
    Ok(())
}
