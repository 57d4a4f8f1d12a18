//! The database directory: who may open it, which engine it belongs to, and whether its
//! creation ever finished.
//!
//! Three files of keystead's own sit beside the engine's files:
//! - `keystead.lock`, held with an exclusive `flock` for as long as a runtime has the
//!   directory open. It is taken before anything else is read, so a second opener (another
//!   process, or another runtime in this process) gets [`OpenError::Locked`] and never sees
//!   a directory that the first opener is still setting up.
//! - `keystead.creating`, present from the moment keystead starts creating a database in an
//!   empty directory until the creation is complete and durable. Nothing can have been
//!   acknowledged in a database whose creation never finished (a runtime answers nothing
//!   before `open` returns), so a directory found in this state is emptied and created
//!   again: a kill at any moment of the very first open never leaves a directory that does
//!   not open.
//! - `keystead.backend`, the engine's name, written atomically (a temporary file, fsync,
//!   rename, fsync of the directory) only once the engine has created its files and the
//!   layout marker is flushed. Its presence means "a complete database of this engine".
//!
//! The order of creation is: take the lock; write `keystead.creating` (fsync it and the
//! directory); let the engine create its files; write and flush the layout marker; write
//! `keystead.backend` atomically; remove `keystead.creating` (fsync the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::OpenError;

/// The file that records which engine created a complete database.
pub(crate) const BACKEND_FILE: &str = "keystead.backend";
/// The temporary file the backend record is written to before it is renamed into place.
const BACKEND_TEMP: &str = "keystead.backend.tmp";
/// Present while a database is being created (see the module docs).
const CREATING_FILE: &str = "keystead.creating";
/// Held with `flock` while a runtime has the directory open.
const LOCK_FILE: &str = "keystead.lock";

/// keystead's own files, which never make a directory "not empty".
const OWN_FILES: [&str; 4] = [BACKEND_FILE, BACKEND_TEMP, CREATING_FILE, LOCK_FILE];

/// The exclusive lock on a database directory, released when dropped.
#[derive(Debug)]
pub(crate) struct DirectoryLock {
    /// Kept open: the `flock` lives as long as this open file description.
    _file: File,
}

/// What `claim` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// A complete database of the requested engine (or one from before the record existed,
    /// now recorded).
    Existing,
    /// An empty directory (or one whose creation never finished, now emptied): the engine
    /// creates its files, then [`finish_creation`] records the database as complete.
    Creating,
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes the directory's exclusive lock, creating the lock file if needed.
///
/// # Errors
/// [`OpenError::Locked`] when another runtime, in this process or another, holds it;
/// [`OpenError::Io`] when the lock file cannot be created or locked.
pub(crate) fn lock(path: &Path) -> Result<DirectoryLock, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path.join(LOCK_FILE))
        .map_err(io_error(path))?;
    match file.try_lock() {
        Ok(()) => Ok(DirectoryLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: path.to_path_buf(),
            detail: format!("{LOCK_FILE} is held by another runtime"),
        }),
        Err(fs::TryLockError::Error(source)) => Err(io_error(path)(source)),
    }
}

/// The engine named by the backend record, `None` when there is no usable record. An
/// empty record can only be the torn write of an older release (which wrote it in place
/// before creating anything), so it counts as no record.
fn recorded_backend(path: &Path) -> Result<Option<String>, OpenError> {
    match fs::read_to_string(path.join(BACKEND_FILE)) {
        Ok(found) if found.trim().is_empty() => Ok(None),
        Ok(found) => Ok(Some(found.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// The engine whose files a directory without a record holds: sled keeps a `conf` file;
/// fjall a `lock` file, a `version` file and a `keyspaces` directory (older releases a
/// `journals` directory).
fn engine_by_files(path: &Path) -> Option<Backend> {
    if path.join("conf").exists() {
        Some(Backend::Sled)
    } else if ["journals", "lock", "version", "keyspaces"]
        .iter()
        .any(|name| path.join(name).exists())
    {
        Some(Backend::Fjall)
    } else {
        None
    }
}

/// The entries of `path` that are not keystead's own files.
fn foreign_entries(path: &Path) -> Result<Vec<PathBuf>, OpenError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(path).map_err(io_error(path))? {
        let entry = entry.map_err(io_error(path))?;
        let name = entry.file_name();
        if !OWN_FILES.iter().any(|own| name == *own) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Checks that `path` (locked by the caller) holds a database of `backend`, or nothing, and
/// says which. A directory whose creation was interrupted is emptied first.
///
/// # Errors
/// [`OpenError::WrongBackend`] for another engine's database, [`OpenError::NotEmpty`] for a
/// directory holding files that are not a database, [`OpenError::Io`] for I/O failures.
pub(crate) fn claim(path: &Path, backend: Backend) -> Result<Claim, OpenError> {
    let creating = path.join(CREATING_FILE);
    if let Some(found) = recorded_backend(path)? {
        if found != backend.name() {
            return Err(OpenError::WrongBackend {
                path: path.to_path_buf(),
                found,
                requested: backend.name(),
            });
        }
        if foreign_entries(path)?.is_empty() {
            // A record with no database beside it (written by hand, or by a tool that
            // prepares directories): create the database as in an empty directory.
            write_file_durably(path, &creating, b"")?;
            return Ok(Claim::Creating);
        }
        // The record is written only once the creation is complete: a creation file left
        // beside it is the last step of that creation, interrupted.
        if creating.exists() {
            fs::remove_file(&creating).map_err(io_error(path))?;
            sync_directory(path)?;
        }
        return Ok(Claim::Existing);
    }
    if creating.exists() {
        // A creation that never finished: nothing was acknowledged in it. Empty the
        // directory (keeping the creation file, removed last, so that a kill while emptying
        // resumes here) and create the database again, with the engine asked for now.
        let leftovers = foreign_entries(path)?;
        tracing::warn!(target: "keystead", path = %path.display(), entries = leftovers.len(),
            "the database creation here was interrupted; nothing was acknowledged in it, creating it again");
        for entry in leftovers {
            remove_entry(&entry).map_err(io_error(path))?;
        }
        remove_temp_record(path)?;
        sync_directory(path)?;
        return Ok(Claim::Creating);
    }
    let foreign = foreign_entries(path)?;
    if foreign.is_empty() {
        remove_temp_record(path)?;
        write_file_durably(path, &creating, b"")?;
        return Ok(Claim::Creating);
    }
    match engine_by_files(path) {
        // Data from before the record existed: record it.
        Some(found) if found == backend => {
            write_record(path, backend)?;
            Ok(Claim::Existing)
        }
        Some(found) => Err(OpenError::WrongBackend {
            path: path.to_path_buf(),
            found: found.name().to_string(),
            requested: backend.name(),
        }),
        None => Err(OpenError::NotEmpty {
            path: path.to_path_buf(),
            found: foreign[0]
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        }),
    }
}

/// Records the database created after [`Claim::Creating`] as complete. Call it only once
/// the engine's files exist and the layout marker is flushed.
///
/// # Errors
/// [`OpenError::Io`] when the record cannot be written durably.
pub(crate) fn finish_creation(path: &Path, backend: Backend) -> Result<(), OpenError> {
    write_record(path, backend)?;
    fs::remove_file(path.join(CREATING_FILE)).map_err(io_error(path))?;
    sync_directory(path)
}

/// Writes the backend record atomically: a reader finds either no record or a whole one.
fn write_record(path: &Path, backend: Backend) -> Result<(), OpenError> {
    let temp = path.join(BACKEND_TEMP);
    write_file_durably(path, &temp, format!("{}\n", backend.name()).as_bytes())?;
    fs::rename(&temp, path.join(BACKEND_FILE)).map_err(io_error(path))?;
    sync_directory(path)
}

fn remove_temp_record(path: &Path) -> Result<(), OpenError> {
    match fs::remove_file(path.join(BACKEND_TEMP)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Creates (or truncates) `file` with `bytes`, fsyncs it and its directory.
fn write_file_durably(dir: &Path, file: &Path, bytes: &[u8]) -> Result<(), OpenError> {
    let mut handle = File::create(file).map_err(io_error(dir))?;
    handle
        .write_all(bytes)
        .and_then(|()| handle.sync_all())
        .map_err(io_error(dir))?;
    sync_directory(dir)
}

/// Makes the directory's entries (creations, renames, removals) durable.
fn sync_directory(path: &Path) -> Result<(), OpenError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(path))
}

fn remove_entry(entry: &Path) -> io::Result<()> {
    match fs::symlink_metadata(entry) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(entry),
        Ok(_) => fs::remove_file(entry),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
