//! Which storage engine holds the data: sled (the default) or fjall (feature `fjall`).

/// The storage engine of a runtime. Chosen with
/// [`RuntimeBuilder::backend`](crate::RuntimeBuilder::backend); a directory remembers the
/// engine that created it, and opening it with the other one is refused with
/// [`OpenError::WrongBackend`](crate::OpenError::WrongBackend).
///
/// | | sled (default) | fjall (feature `fjall`) |
/// |---|---|---|
/// | what an acknowledged write survives | a crash of the process (`sync_file_range`; the drive's write cache is not flushed) | a crash of the process and, on a drive that honours `fdatasync`, a power loss |
/// | engine | B-tree-ish log-structured pages | LSM tree |
///
/// `docs/performance.md` and `docs/reliability.md` give both engines' measured figures.
///
/// ```
/// use keystead::{Backend, Runtime};
/// # let dir = tempfile::tempdir().unwrap();
/// assert_eq!(Backend::default(), Backend::Sled);
/// let builder = Runtime::builder(dir.path()).backend(Backend::Sled);
/// # drop(builder);
/// assert_eq!(Backend::Fjall.name(), "fjall");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// sled 0.34 (the default).
    #[default]
    Sled,
    /// fjall 3 (requires keystead's `fjall` cargo feature).
    Fjall,
}

impl Backend {
    /// The engine's name, as stored in the directory's `keystead.backend` file.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Fjall => "fjall",
        }
    }

    /// Every engine compiled into this build (sled always; fjall with its feature).
    ///
    /// ```
    /// assert!(keystead::Backend::available().contains(&keystead::Backend::Sled));
    /// ```
    pub fn available() -> Vec<Backend> {
        let mut all = vec![Backend::Sled];
        if cfg!(feature = "fjall") {
            all.push(Backend::Fjall);
        }
        all
    }
}
