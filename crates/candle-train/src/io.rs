//! Crash-safe file writes: write a temporary file, flush it to disk, rename it into place.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest state file (checkpoint data, optimizer state, model weights) read whole: 1 TiB,
/// far beyond any model this library trains on one machine, but finite.
pub const MAX_STATE_BYTES: u64 = 1 << 40;
/// The largest corpus read (64 GiB; it is held in memory whole).
pub const MAX_CORPUS_BYTES: u64 = 64 << 30;
/// The largest JSON config file read (`config.json`).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The JSON file at `path` (at most [`MAX_CONFIG_BYTES`]) as a `T` (a model's
/// `config.json`).
///
/// # Errors
/// As [`read_bounded`] (and [`Error::Io`] for text that is not UTF-8);
/// [`Error::InvalidConfig`] (field `config.json`) when it does not parse as a `T`.
pub fn read_json_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = read_bounded(path, MAX_CONFIG_BYTES)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| Error::io("read", path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    serde_json::from_str(&text).map_err(|e| Error::config("config.json", e.to_string()))
}

/// The tensors of the safetensors file at `path` (at most [`MAX_STATE_BYTES`]), by name, on
/// `device`.
///
/// # Errors
/// As [`read_bounded`]; [`Error::MalformedState`] naming the file when it is not safetensors.
pub fn read_safetensors(
    path: &Path,
    device: &candle::Device,
) -> Result<std::collections::HashMap<String, candle::Tensor>> {
    let bytes = read_bounded(path, MAX_STATE_BYTES)?;
    candle::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })
}

/// Reads the file at `path` whole, refusing one that is not a regular file (a FIFO or device
/// would block or never end) or that is longer than `limit` bytes, with a clear error, before
/// reading; the read itself stops after `limit` bytes (a file growing meanwhile is cut there
/// and its length no longer matches what the caller expects).
///
/// # Errors
/// [`Error::Io`] naming the file: missing, unreadable, not a regular file, or too long.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    // The type from the path's metadata before opening: opening a FIFO blocks until a writer
    // appears, and a device never ends.
    let before = fs::metadata(path).map_err(|e| Error::io("read", path, e))?;
    if !before.is_file() {
        return Err(Error::io(
            "read",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let file = fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("read", path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            "read",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    if meta.len() > limit {
        return Err(Error::io(
            "read",
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("it is {} bytes, more than the {limit} expected", meta.len()),
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit).read_to_end(&mut bytes).map_err(|e| Error::io("read", path, e))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` so that a crash at any instant leaves either the old file or the
/// new one, never a torn mix: the data goes to `path.tmp-<pid>`, is synced, then renamed.
///
/// # Errors
/// [`Error::Io`] naming the file and the failed action.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io("write", &tmp, e))?;
        file.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temporary() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("candle-train-io-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let path = dir.join("file.bin");
        write_atomic(&path, b"old")?;
        write_atomic(&path, b"new")?;
        assert_eq!(fs::read(&path).map_err(|e| Error::io("read", &path, e))?, b"new");
        let entries = fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?.count();
        assert_eq!(entries, 1);
        let missing = write_atomic(&dir.join("no/such/dir/f"), b"x");
        assert!(matches!(missing, Err(Error::Io { action: "create", .. })));
        fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        Ok(())
    }

    #[test]
    fn bounded_reads_refuse_devices_fifos_and_long_files_before_reading() -> Result<()> {
        // A device that never ends: refused at once, not read until memory runs out.
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("not a regular file")), "{e:?}");
        let dir = std::env::temp_dir().join(format!("candle-train-bounded-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        // A FIFO with no writer: refused at once, not waited on (opening it would block).
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        if made {
            let e = read_bounded(&fifo, 1 << 20).err().map(|e| e.to_string());
            assert!(e.as_deref().is_some_and(|e| e.contains("not a regular file")), "{e:?}");
        }
        let path = dir.join("f");
        write_atomic(&path, &[7u8; 100])?;
        assert_eq!(read_bounded(&path, 100)?.len(), 100);
        let e = read_bounded(&path, 99).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("100 bytes, more than the 99")), "{e:?}");
        fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        Ok(())
    }
}
