//! Listing the entities of a type, and reading many at once, straight from the store
//! (never through the actors, never blocking writers).
//!
//! What a listing is: each entry is a committed, durable state header (its revision,
//! version and update time when it was read); pages follow the keys in byte order. It is
//! **not** a point-in-time view of all entities: a page read later may show an entity
//! that changed after an earlier page was read, and an entity created after the listing
//! began shows up only if its key comes after the cursor.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use crate::core::codec;
use crate::core::keys;
use crate::core::records::StateHeader;
use crate::entity::Entity;
use crate::error::{AdminError, SubmitError};
use crate::runtime::address::{snapshot_from, Snapshot};
use crate::runtime::inner::Inner;
use crate::runtime::shared::check_key;
use crate::runtime::Runtime;

/// The most entries one page may hold.
pub const LIST_PAGE_MAX: usize = 10_000;

/// One entity in a listing: its key and the header of its committed state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listed {
    /// The entity key.
    pub key: String,
    /// Changes applied so far.
    pub revision: u64,
    /// The highest source version applied, if any.
    pub version: Option<u64>,
    /// When its last change was committed, ms since the epoch on the runtime's clock.
    pub updated_at_ms: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page {
    /// The entities of this page, in key order (bytes).
    pub entries: Vec<Listed>,
    /// Where the next page starts ([`Listing::after`]); `None` after the last page.
    pub next: Option<String>,
}

/// A listing of entity type `E`'s keys, built by [`Runtime::entities`]; await it for one
/// [`Page`].
///
/// ```
/// # use keystead::{Context, Entity, Failure, FailureKind, Runtime};
/// # #[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize, Clone, PartialEq)]
/// # #[error("never")] struct Never;
/// # impl Failure for Never { fn kind(&self) -> FailureKind { FailureKind::Permanent } }
/// # struct Product;
/// # impl Entity for Product {
/// #     const NAME: &'static str = "product";
/// #     type State = u64; type Command = u64; type Reply = u64; type Error = Never;
/// #     fn handle(s: &mut u64, c: &u64, _: &mut Context<'_>) -> Result<u64, Never> { *s = *c; Ok(*s) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let rt = Runtime::builder(dir.path()).register::<Product>().open()?;
/// for sku in ["lamp-1", "lamp-2", "sofa-1"] {
///     rt.entity::<Product>(sku).ask(1).await?;
/// }
/// let lamps = rt.entities::<Product>().prefix("lamp-").await?;
/// let keys: Vec<&str> = lamps.entries.iter().map(|e| e.key.as_str()).collect();
/// assert_eq!(keys, ["lamp-1", "lamp-2"]);
/// // Paging: a cursor is the last key of a page.
/// let first = rt.entities::<Product>().limit(2).await?;
/// let rest = rt.entities::<Product>().after(first.next.unwrap()).await?;
/// assert_eq!(rest.entries[0].key, "sofa-1");
/// # rt.shutdown().await; Ok(()) }
/// ```
#[must_use = "a Listing does nothing until awaited"]
pub struct Listing<E: Entity> {
    inner: Weak<Inner>,
    prefix: String,
    after: Option<String>,
    limit: usize,
    _entity: PhantomData<fn() -> E>,
}

impl<E: Entity> std::fmt::Debug for Listing<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listing")
            .field("entity", &E::NAME)
            .field("prefix", &self.prefix)
            .field("after", &self.after)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<E: Entity> Listing<E> {
    /// Only keys starting with `prefix`. Default: every key.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Only keys after `key` (the previous page's [`Page::next`]). Default: from the first.
    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after = Some(key.into());
        self
    }

    /// At most `entries` per page, 1 to [`LIST_PAGE_MAX`]. Default: 100.
    pub fn limit(mut self, entries: usize) -> Self {
        self.limit = entries.clamp(1, LIST_PAGE_MAX);
        self
    }
}

impl<E: Entity> IntoFuture for Listing<E> {
    type Output = Result<Page, AdminError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let inner = self
                .inner
                .upgrade()
                .filter(|i| !i.is_closed())
                .ok_or(AdminError::Closed)?;
            if !inner.registered::<E>() {
                return Err(AdminError::NotRegistered { entity: E::NAME });
            }
            let prefix = keys::entity_index_prefix(E::NAME, &self.prefix);
            let start = match &self.after {
                // Strictly after: the smallest key greater than `after`.
                Some(after) => {
                    let mut start = keys::entity_index(E::NAME, after);
                    start.push(0);
                    start.max(prefix.clone())
                }
                None => prefix.clone(),
            };
            let mut entries = Vec::with_capacity(self.limit.min(1024));
            let mut more = false;
            for entry in inner.store.scan_from(&prefix, &start)? {
                let (index_key, _) = entry?;
                let Some(key) = keys::entity_index_key(E::NAME, &index_key) else {
                    continue;
                };
                if entries.len() == self.limit {
                    more = true;
                    break;
                }
                let Some(bytes) = inner.store.get(&keys::state(E::NAME, key))? else {
                    continue;
                };
                let header: StateHeader =
                    codec::decode_head("state", &bytes).map_err(|source| AdminError::Decode {
                        entity: E::NAME,
                        key: key.to_string(),
                        source,
                    })?;
                entries.push(Listed {
                    key: key.to_string(),
                    revision: header.revision,
                    version: header.version,
                    updated_at_ms: header.updated_at_ms,
                });
            }
            // Show only what a crash cannot take back (see `EntityRef::snapshot`).
            let durable = inner.store.reads_durable();
            drop(inner);
            durable.await?;
            let next = more
                .then(|| entries.last().map(|e| e.key.clone()))
                .flatten();
            Ok(Page { entries, next })
        })
    }
}

impl Runtime {
    /// Lists the entities of type `E` (those that have applied at least one message), in
    /// key order, one page at a time; see [`Listing`]. Reads the store directly: no actor
    /// is started, no writer waits.
    pub fn entities<E: Entity>(&self) -> Listing<E> {
        Listing {
            inner: Arc::downgrade(&self.inner),
            prefix: String::new(),
            after: None,
            limit: 100,
            _entity: PhantomData,
        }
    }

    /// The committed states of many entities of type `E` at once, in the order of `keys`
    /// (an entity that never applied a message reads as its default state at revision 0).
    /// Each is a committed, durable state; together they are not a point-in-time view.
    ///
    /// # Errors
    /// [`SubmitError::InvalidKey`] naming the first invalid key; [`SubmitError::Storage`],
    /// [`SubmitError::Decode`], [`SubmitError::Closed`], [`SubmitError::NotRegistered`].
    pub async fn snapshots<E: Entity, K: AsRef<str>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Snapshot<E::State>>, SubmitError> {
        if !self.inner.registered::<E>() {
            return Err(SubmitError::NotRegistered { entity: E::NAME });
        }
        let storage = |key: &str, source| SubmitError::Storage {
            entity: E::NAME,
            key: key.to_string(),
            source,
        };
        let mut read = Vec::new();
        for key in keys {
            let key = key.as_ref();
            check_key(E::NAME, key)?;
            let bytes = self
                .inner
                .store
                .get(&keys::state(E::NAME, key))
                .map_err(|e| storage(key, e))?;
            read.push((key.to_string(), bytes));
        }
        self.inner
            .store
            .reads_durable()
            .await
            .map_err(|e| storage("", e))?;
        read.into_iter()
            .map(|(key, bytes)| snapshot_from::<E>(&key, bytes))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::core::keys;
    use crate::store::Op;
    use crate::{Context, Entity, Failure, FailureKind, Runtime};

    #[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
    #[error("never")]
    struct Never;
    impl Failure for Never {
        fn kind(&self) -> FailureKind {
            FailureKind::Permanent
        }
    }
    struct Item;
    impl Entity for Item {
        const NAME: &'static str = "item";
        type State = u8;
        type Command = u8;
        type Reply = u8;
        type Error = Never;
        fn handle(s: &mut u8, c: &u8, _: &mut Context<'_>) -> Result<u8, Never> {
            *s = *c;
            Ok(*s)
        }
    }

    /// A database from before the listing index (its entries and marker absent) gets the
    /// index built at open, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_from_before_the_index_is_indexed_at_open() {
        for backend in crate::Backend::available() {
            let dir = tempfile::tempdir().unwrap();
            let open = || {
                Runtime::builder(dir.path())
                    .backend(backend)
                    .register::<Item>()
                    .open()
                    .unwrap()
            };
            let rt = open();
            for key in ["b", "a", "c"] {
                rt.entity::<Item>(key).ask(1).await.unwrap();
            }
            // Take the index away, as a database written before it would be.
            let mut ops: Vec<Op> = ["a", "b", "c"]
                .iter()
                .map(|k| Op::Delete(keys::entity_index("item", k)))
                .collect();
            ops.push(Op::Delete(keys::meta(
                super::super::builder::ENTITY_INDEX_MARKER,
            )));
            rt.inner.store.commit(ops).await.unwrap();
            assert!(rt.entities::<Item>().await.unwrap().entries.is_empty());
            rt.shutdown().await;
            let rt = open();
            let page = rt.entities::<Item>().await.unwrap();
            let listed: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(listed, ["a", "b", "c"], "{}", backend.name());
            rt.shutdown().await;
        }
    }
}
