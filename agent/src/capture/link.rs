//! Replacing the program behind a pinned link in place (`BPF_LINK_UPDATE`).
//!
//! aya 0.14 (pinned: newer releases need a newer rustc) can pin and re-open links but not update
//! them, and gives no access to a pinned link's descriptor; these three `bpf()` commands are the
//! whole of what the upgrade path needs, so they are issued directly rather than through another
//! crate.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` is at most this large for the commands used here; the kernel requires the bytes
/// past the command's fields to be zero.
type Attr = [u64; 16];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed buffer laid out as the kernel's `union bpf_attr` for `cmd`, and
    // outlives the call; the size passed is its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens a pinned object (here: a link) by its bpffs path.
pub(super) fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr: Attr = [0; 16];
    attr[0] = c.as_ptr() as u64; // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// (link id, program id) of a link.
pub(super) fn link_ids(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // struct bpf_link_info starts with: __u32 type; __u32 id; __u32 prog_id;
    let mut info = [0u32; 32];
    let mut attr: Attr = [0; 16];
    attr[0] = u64::from(link.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[1], info[2]))
}

/// Makes the link run `prog` from now on: one atomic swap in the kernel, the hook is never without a
/// program.
pub(super) fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: Attr = [0; 16];
    // link_fd, new_prog_fd; flags and old_prog_fd stay 0 (replace whatever is attached).
    attr[0] = u64::from(link.as_raw_fd() as u32) | (u64::from(prog.as_raw_fd() as u32) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
