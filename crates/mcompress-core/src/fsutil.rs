//! File helpers: hashing and atomic writes.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Lowercase hex sha256 of a file's content, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs_err::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of an input file, remembered across runs: the digest is kept in a small cache entry
/// keyed by the file's canonical path and checked against its device, inode, size, mtime and
/// ctime (all to the nanosecond; ctime changes on any write and cannot be set by users), the
/// same stat test git uses for its index. A mismatch, a missing or unreadable entry, or
/// `MCOMPRESS_NO_HASH_CACHE=1` means the file is hashed again. The cache lives in
/// `$MCOMPRESS_CACHE_DIR`, else `$XDG_CACHE_HOME/mcompress`, else `~/.cache/mcompress`, under
/// `sha256/`. Rerunning a recipe on an unchanged 14 GB model skips ~7 CPU-seconds of hashing.
pub fn sha256_file_cached(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = cache_dir().filter(|_| std::env::var_os("MCOMPRESS_NO_HASH_CACHE").is_none()) else {
        return sha256_file(path);
    };
    let canon = fs_err::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let stamp = |m: &std::fs::Metadata| {
        format!(
            "{} {} {} {}.{} {}.{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        )
    };
    let meta = fs_err::metadata(&canon).map_err(|e| Error::io(path, e))?;
    let entry = dir.join(sha256_bytes(canon.as_os_str().as_encoded_bytes()));
    let key = stamp(&meta);
    if let Ok(text) = std::fs::read_to_string(&entry)
        && let Some((k, digest)) = text.trim_end().rsplit_once(' ')
        && k == key
        && digest.len() == 64
    {
        return Ok(digest.to_string());
    }
    let digest = sha256_file(path)?;
    // Only remember the digest if the file did not change while it was read.
    if fs_err::metadata(&canon).is_ok_and(|m| stamp(&m) == key) {
        let _ = std::fs::create_dir_all(&dir);
        let _ = write_atomic(&entry, format!("{key} {digest}\n").as_bytes());
    }
    Ok(digest)
}

fn cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("MCOMPRESS_CACHE_DIR").map(std::path::PathBuf::from).or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(|x| std::path::PathBuf::from(x).join("mcompress"))
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/mcompress")))
    })?;
    Some(base.join("sha256"))
}

/// Lowercase hex sha256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Refuses anything but a regular file (after following links) before it is opened: opening a
/// FIFO blocks until a writer comes, and devices read without end.
pub fn check_regular(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        Ok(())
    } else {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
        Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, what)))
    }
}

/// Opens a regular file of at most `limit` bytes for reading. FIFOs, devices, sockets and
/// directories are refused before they are opened (opening a FIFO would block until a writer
/// comes), and so is a file larger than `limit`; the opened file is checked again (`fstat`).
pub fn open_regular(path: &Path, limit: u64) -> std::io::Result<std::fs::File> {
    use std::io::{Error as IoError, ErrorKind};
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(IoError::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > limit {
        return Err(IoError::new(
            ErrorKind::InvalidData,
            format!("{} bytes: larger than the {limit}-byte limit", meta.len()),
        ));
    }
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(IoError::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(f)
}

/// Reads a regular file of at most `limit` bytes ([`open_regular`]); a file that grows past
/// `limit` while it is read is refused without being read whole.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let f = open_regular(path, limit)?;
    let mut out = Vec::with_capacity(usize::try_from(f.metadata()?.len()).unwrap_or(0));
    f.take(limit.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {limit}-byte limit"),
        ));
    }
    Ok(out)
}

/// Limit of [`read_regular`] for JSON side files (config.json, index, modules.json, reports).
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it into place, so a
/// reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e| Error::io(path, e);
    {
        let mut f = fs_err::File::create(&tmp).map_err(io)?;
        std::io::Write::write_all(&mut f, bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs_err::rename(&tmp, path).map_err(io)
}

/// Why `dir` cannot be a directory this tool fills and clears (a checkpoint: its contents are
/// replaced), or `None` when it is absent, empty, or holds only regular files whose names `ours`
/// accepts. `what` names the directory's kind in the message.
pub fn own_dir_problem(dir: &Path, what: &str, ours: impl Fn(&str) -> bool) -> Option<String> {
    let meta = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(e.to_string()),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return Some("exists and is not a directory".into());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return Some(e.to_string()),
    };
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(e) => return Some(e.to_string()),
        };
        let name = e.file_name().to_string_lossy().into_owned();
        if !ours(&name) || !e.file_type().is_ok_and(|t| t.is_file()) {
            return Some(format!(
                "holds {name:?}, which is not part of a {what}: checkpoints replace this directory's contents, \
                 so it must be absent, empty or a checkpoint of mcompress"
            ));
        }
    }
    None
}

/// The process's peak resident memory (`VmHWM` of `/proc/self/status`), in bytes, since it
/// started or since the last [`reset_peak_rss`]. `None` where the kernel does not say (not Linux).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resets the peak [`peak_rss`] reports to the current resident memory (Linux: `5` written to
/// `/proc/self/clear_refs`), so that a later reading is the peak of what ran in between. Whether
/// it could.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_own_dir_problem_accepts_only_our_regular_files() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("ckpt");
        let ours = |n: &str| n == "state.json";
        assert_eq!(own_dir_problem(&dir, "x checkpoint", ours), None, "absent");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(own_dir_problem(&dir, "x checkpoint", ours), None, "empty");
        std::fs::write(dir.join("state.json"), "{}").unwrap();
        assert_eq!(own_dir_problem(&dir, "x checkpoint", ours), None, "ours");
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let p = own_dir_problem(&dir, "x checkpoint", ours).unwrap();
        assert!(p.contains("\"notes.txt\"") && p.contains("not part of a x checkpoint"), "{p}");
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        // Our name, but a link: refused (the tool would write through it).
        std::fs::remove_file(dir.join("state.json")).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(t.path().join("elsewhere"), dir.join("state.json")).unwrap();
            assert!(own_dir_problem(&dir, "x checkpoint", ours).is_some(), "a symlink");
        }
        let file = t.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert_eq!(own_dir_problem(&file, "x checkpoint", ours).as_deref(), Some("exists and is not a directory"));
    }

    #[test]
    fn test_read_regular_refuses_fifos_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert!(read_regular(&f, 4).unwrap_err().to_string().contains("limit"));
        assert!(read_regular(dir.path(), 4).unwrap_err().to_string().contains("not a regular file"));
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        // Returns at once instead of blocking in open().
        assert!(read_regular(&fifo, 4).unwrap_err().to_string().contains("not a regular file"));
    }

    #[test]
    fn test_cached_hash_follows_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.bin");
        std::fs::write(&f, b"one").unwrap();
        let cache = dir.path().join("cache");
        let run = |p: &Path| {
            // The cache location comes from the environment; scope it to this test's dir.
            temp_env(&cache, || sha256_file_cached(p).unwrap())
        };
        let a = run(&f);
        assert_eq!(a, sha256_bytes(b"one"));
        assert_eq!(std::fs::read_dir(cache.join("sha256")).unwrap().count(), 1, "entry written");
        assert_eq!(run(&f), a, "served from the cache");
        std::fs::write(&f, b"two").unwrap();
        assert_eq!(run(&f), sha256_bytes(b"two"), "a rewrite changes ctime/mtime and is rehashed");
    }

    fn temp_env<T>(cache: &Path, f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK.lock().unwrap();
        // SAFETY: serialised by LOCK; no other thread in this test binary reads this variable.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("MCOMPRESS_CACHE_DIR", cache);
        }
        let out = f();
        #[allow(unsafe_code)]
        unsafe {
            std::env::remove_var("MCOMPRESS_CACHE_DIR");
        }
        out
    }

    #[test]
    fn test_peak_rss_follows_an_allocation() {
        let Some(before) = peak_rss() else { return }; // not Linux
        assert!(reset_peak_rss());
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let peak = peak_rss().unwrap();
        assert!(peak >= 64 << 20, "{peak} after touching 64 MiB (was {before})");
    }
}
