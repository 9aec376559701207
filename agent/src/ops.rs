//! The operations that are not about processes: files, clock, BPF_PROG_TERMINATE.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use termlab_protocol::{
    ClockReading, FileContents, ReadFileRequest, SyscallResult, TerminateReply, TerminateRequest,
    WriteFileRequest, WriteReply, BPF_PROG_TERMINATE,
};

use crate::sys::{errno_info, io_error, monotonic_ns, realtime_ns};
use termlab_protocol::{ErrorKind, ErrorReply};

/// Read size for read_file. Large because /dev/kmsg returns one record per read() and fails
/// with EINVAL when the buffer is smaller than the record.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Reads up to `max_bytes`. Files under /proc report size 0, so this reads until EOF rather than
/// trusting the size. Opened non-blocking so that a device with nothing more to give
/// (/dev/kmsg, a FIFO) ends the read instead of hanging the connection; with `wait_ms`, a file
/// that has nothing at all to give yet is polled for that long first (see
/// [`ReadFileRequest::wait_ms`]).
pub fn read_file(request: &ReadFileRequest) -> Result<FileContents, ErrorReply> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&request.path)
        .map_err(|e| io_error(format!("open {}", request.path), &e))?;
    let read_error = |e: &io::Error| io_error(format!("read {}", request.path), e);
    let mut data = Vec::new();
    let would_block =
        read_into(&mut file, request.max_bytes, &mut data).map_err(|e| read_error(&e))?;
    if data.is_empty() && would_block && request.wait_ms > 0 {
        let deadline = Instant::now() + Duration::from_millis(request.wait_ms);
        if wait_readable(&file, deadline).map_err(|e| read_error(&e))? {
            read_into(&mut file, request.max_bytes, &mut data).map_err(|e| read_error(&e))?;
        }
    }
    let truncated = data.len() as u64 > request.max_bytes;
    data.truncate(request.max_bytes as usize);
    Ok(FileContents { data: data.into(), truncated })
}

/// Appends what `file` gives now to `data`, one byte past `max_bytes` at most (which tells
/// whether it had more); true when it ended because nothing more was ready (EAGAIN).
fn read_into(file: &mut File, max_bytes: u64, data: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    while data.len() as u64 <= max_bytes {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => data.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Waits until `file` is readable or `deadline` passes; true when readable.
fn wait_readable(file: &File, deadline: Instant) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut poll_fd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let timeout_ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, living across the call; the fd stays open (borrowed `file`).
        let ready = unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
        match ready {
            0 => {}
            1.. => return Ok(true),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Writes the data with a single write(): a sysctl takes its value from the first write only.
/// Creates a missing file, truncates an existing one.
pub fn write_file(request: &WriteFileRequest) -> Result<WriteReply, ErrorReply> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&request.path)
        .map_err(|e| io_error(format!("open {} for writing", request.path), &e))?;
    let bytes = request.data.as_bytes();
    let written = file.write(bytes).map_err(|e| io_error(format!("write {}", request.path), &e))?;
    if written != bytes.len() {
        let short = io::Error::new(
            io::ErrorKind::WriteZero,
            format!("only {written} of {} bytes were accepted", bytes.len()),
        );
        return Err(io_error(format!("write {}", request.path), &short));
    }
    Ok(WriteReply { bytes_written: written as u64 })
}

pub fn clock() -> ClockReading {
    ClockReading { monotonic_ns: monotonic_ns(), realtime_ns: realtime_ns() }
}

/// `union bpf_attr` as BPF_PROG_TERMINATE reads it.
#[repr(C)]
struct ProgTerminateAttr {
    prog_id: u32,
    flags: u32,
}

fn bpf_prog_terminate(prog_id: u32, flags: u32) -> TerminateReply {
    let attr = ProgTerminateAttr { prog_id, flags };
    let before_ns = monotonic_ns();
    // SAFETY: bpf() reads size_of::<ProgTerminateAttr>() bytes from a live, initialized struct.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TERMINATE as libc::c_long,
            &attr as *const ProgTerminateAttr,
            std::mem::size_of::<ProgTerminateAttr>() as libc::c_uint,
        )
    };
    let after_ns = monotonic_ns();
    let result = if ret < 0 {
        SyscallResult::Failed(errno_info(io::Error::last_os_error().raw_os_error().unwrap_or(0)))
    } else {
        SyscallResult::Returned(ret)
    };
    TerminateReply { result, before_ns, after_ns }
}

/// Drops this thread (only this thread: raw syscalls, not the libc wrappers that change every
/// thread) to `uid`/`gid` = `uid`, which also clears its capabilities.
fn drop_thread_privileges(uid: u32) -> io::Result<()> {
    // SAFETY: plain syscalls with integer arguments.
    unsafe {
        if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn terminate(request: &TerminateRequest) -> Result<TerminateReply, ErrorReply> {
    let Some(uid) = request.as_uid else {
        return Ok(bpf_prog_terminate(request.prog_id, request.flags));
    };
    let (prog_id, flags) = (request.prog_id, request.flags);
    // A short-lived thread carries the reduced credentials and takes them with it when it ends.
    std::thread::Builder::new()
        .name("terminate-unprivileged".into())
        .spawn(move || {
            drop_thread_privileges(uid)
                .map_err(|e| io_error(format!("switch to uid {uid}"), &e))
                .map(|()| bpf_prog_terminate(prog_id, flags))
        })
        .map_err(|e| io_error("start the unprivileged thread", &e))?
        .join()
        .unwrap_or_else(|_| {
            Err(ErrorReply::new(ErrorKind::Internal, "the unprivileged terminate thread panicked"))
        })
}
