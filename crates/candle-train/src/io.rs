//! Crash-safe file writes: write a temporary file, flush it to disk, rename it into place.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
}
