//! Every `unsafe` system call of the crate lives here, each with a comment saying why it is
//! sound.
