//! Field-level merge, for a state that several paths write: a fast path (a product's name and
//! price as they arrive) and a slow one (details from an enrichment service, computed from
//! whatever the product looked like when it was sent). Each field carries the stamp of the
//! write that set it and a rule, so that a slow result computed from an older source never
//! overwrites a field a fresher fast write set, whatever order the writes arrive in.
//!
//! A stamp is what the writer knew: the version of the source a value was computed from (or
//! a time). Larger is newer. The rules:
//!
//! | type | keeps | a write with a lower stamp |
//! |---|---|---|
//! | [`Newest`] | the value with the highest stamp | loses |
//! | [`First`] | the value with the lowest stamp | wins |
//! | [`Max`] | the largest value (no stamp) | |
//! | [`Union`] | every value written (a set) | |
//! | [`Owned`] | like `Newest`, but only one path may write it | loses |
//!
//! Ties between equal stamps go to the larger value (the smaller for `First`), so every rule
//! is a join: merging is commutative, associative and idempotent, and any interleaving of
//! the same writes ends in the same state (property-tested below). An unset field is honest
//! about being incomplete: `get` is `None` until some path set it ("details loading").
//!
//! Put the fields in the entity's state, set them in the handler, and merge whole states
//! with [`Merge`] (implement it with [`impl_merge!`](crate::impl_merge)):
//!
//! ```
//! use keystead::merge::{Merge, Newest, Owned, Owner, Union};
//!
//! struct Fast;
//! impl Owner for Fast { const PATH: &'static str = "fast"; }
//!
//! #[derive(Default)]
//! struct Product {
//!     name: Newest<String>,
//!     price: Owned<u64, Fast>,
//!     details: Newest<String>,
//!     tags: Union<String>,
//! }
//! keystead::impl_merge!(Product { name, price, details, tags });
//!
//! let mut product = Product::default();
//! product.name.set("Lamp".into(), 2);                  // fast path, source version 2
//! product.price.set("fast", 30, 2).unwrap();
//! // The enrichment was computed from version 1: its name is older, its details are new.
//! product.name.set("lamp (old)".into(), 1);
//! product.details.set("brass, 40 cm".into(), 1);
//! assert!(product.price.set("slow", 99, 3).is_err()); // only the fast path sets the price
//! assert_eq!(product.name.get().map(String::as_str), Some("Lamp"));
//! assert_eq!(product.details.get().map(String::as_str), Some("brass, 40 cm"));
//! assert_eq!(product.price.get(), Some(&30));
//!
//! // Two copies written apart merge into the same state in either order.
//! let mut other = Product::default();
//! other.tags.insert("lighting".into());
//! product.merge(&other);
//! assert!(product.tags.contains(&"lighting".to_string()));
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

/// What a writer knew when it computed a value: the version of its source, or a time.
/// Larger is newer.
pub type Stamp = u64;

/// A value that merges with another copy of itself by its rule. Every implementation here
/// is commutative, associative and idempotent.
pub trait Merge {
    /// Merges `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// Implements [`Merge`] for a struct by merging each listed field.
///
/// ```
/// # use keystead::merge::{Max, Newest};
/// #[derive(Default)]
/// struct Stock { count: Newest<u32>, peak: Max<u32> }
/// keystead::impl_merge!(Stock { count, peak });
/// ```
#[macro_export]
macro_rules! impl_merge {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::merge::Merge for $ty {
            fn merge(&mut self, other: &Self) {
                $( $crate::merge::Merge::merge(&mut self.$field, &other.$field); )*
            }
        }
    };
}

/// The newest write wins: the value with the highest stamp (equal stamps: the larger value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Newest<T> {
    set: Option<(Stamp, T)>,
}

impl<T> Default for Newest<T> {
    fn default() -> Self {
        Self { set: None }
    }
}

impl<T: Ord + Clone> Newest<T> {
    /// Writes `value` computed at `stamp`; true if it is now the field's value (it was not
    /// older than the value there).
    pub fn set(&mut self, value: T, stamp: Stamp) -> bool {
        let newer = match &self.set {
            None => true,
            Some((at, current)) => (stamp, &value) > (*at, current),
        };
        if newer {
            self.set = Some((stamp, value));
        }
        newer
    }

    /// The value, or `None` while no path has set it.
    pub fn get(&self) -> Option<&T> {
        self.set.as_ref().map(|(_, value)| value)
    }

    /// The stamp of the write that set the value.
    pub fn stamp(&self) -> Option<Stamp> {
        self.set.as_ref().map(|(stamp, _)| *stamp)
    }

    /// True once some path has set it.
    pub fn is_set(&self) -> bool {
        self.set.is_some()
    }
}

impl<T: Ord + Clone> Merge for Newest<T> {
    fn merge(&mut self, other: &Self) {
        if let Some((stamp, value)) = &other.set {
            self.set(value.clone(), *stamp);
        }
    }
}

/// The first write stays: the value with the lowest stamp (equal stamps: the smaller value).
/// For what is decided once, such as when a product was first seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct First<T> {
    set: Option<(Stamp, T)>,
}

impl<T> Default for First<T> {
    fn default() -> Self {
        Self { set: None }
    }
}

impl<T: Ord + Clone> First<T> {
    /// Writes `value` computed at `stamp`; true if it is now the field's value (it was not
    /// newer than the value there).
    pub fn set(&mut self, value: T, stamp: Stamp) -> bool {
        let earlier = match &self.set {
            None => true,
            Some((at, current)) => (stamp, &value) < (*at, current),
        };
        if earlier {
            self.set = Some((stamp, value));
        }
        earlier
    }

    /// The value, or `None` while no path has set it.
    pub fn get(&self) -> Option<&T> {
        self.set.as_ref().map(|(_, value)| value)
    }

    /// The stamp of the write that set the value.
    pub fn stamp(&self) -> Option<Stamp> {
        self.set.as_ref().map(|(stamp, _)| *stamp)
    }
}

impl<T: Ord + Clone> Merge for First<T> {
    fn merge(&mut self, other: &Self) {
        if let Some((stamp, value)) = &other.set {
            self.set(value.clone(), *stamp);
        }
    }
}

/// The largest value written, whenever it was written (a high-water mark, a best rating).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Max<T> {
    value: Option<T>,
}

impl<T> Default for Max<T> {
    fn default() -> Self {
        Self { value: None }
    }
}

impl<T: Ord + Clone> Max<T> {
    /// Writes `value`; true if it is now the field's value.
    pub fn set(&mut self, value: T) -> bool {
        let larger = self.value.as_ref().is_none_or(|current| value > *current);
        if larger {
            self.value = Some(value);
        }
        larger
    }

    /// The value, or `None` while no path has set it.
    pub fn get(&self) -> Option<&T> {
        self.value.as_ref()
    }
}

impl<T: Ord + Clone> Merge for Max<T> {
    fn merge(&mut self, other: &Self) {
        if let Some(value) = &other.value {
            self.set(value.clone());
        }
    }
}

/// Every value any path wrote (tags, categories). Values are never removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Union<T: Ord> {
    values: BTreeSet<T>,
}

impl<T: Ord> Default for Union<T> {
    fn default() -> Self {
        Self {
            values: BTreeSet::new(),
        }
    }
}

impl<T: Ord + Clone> Union<T> {
    /// Adds `value`; true if it was not there.
    pub fn insert(&mut self, value: T) -> bool {
        self.values.insert(value)
    }

    /// True if some path wrote `value`.
    pub fn contains(&self, value: &T) -> bool {
        self.values.contains(value)
    }

    /// Every value, in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True while no path wrote any value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl<T: Ord + Clone> Merge for Union<T> {
    fn merge(&mut self, other: &Self) {
        self.values.extend(other.values.iter().cloned());
    }
}

/// The one path that may write an [`Owned`] field.
pub trait Owner {
    /// Its name, as writers give it to [`Owned::set`].
    const PATH: &'static str;
}

/// A field only one path may write (only the fast path sets the price); among its writes the
/// newest wins, as in [`Newest`].
#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct Owned<T, O: Owner> {
    field: Newest<T>,
    #[serde(skip)]
    owner: PhantomData<fn() -> O>,
}

impl<T, O: Owner> Default for Owned<T, O> {
    fn default() -> Self {
        Self {
            field: Newest::default(),
            owner: PhantomData,
        }
    }
}

impl<T: Clone, O: Owner> Clone for Owned<T, O> {
    fn clone(&self) -> Self {
        Self {
            field: self.field.clone(),
            owner: PhantomData,
        }
    }
}

impl<T: PartialEq, O: Owner> PartialEq for Owned<T, O> {
    fn eq(&self, other: &Self) -> bool {
        self.field == other.field
    }
}

impl<T: fmt::Debug, O: Owner> fmt::Debug for Owned<T, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owned")
            .field("owner", &O::PATH)
            .field("set", &self.field.set)
            .finish()
    }
}

/// A write to an [`Owned`] field by a path that does not own it; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path {writer:?} may not write this field: only {owner:?} does; leave it out of that path's result")]
pub struct NotOwner {
    /// The path that tried.
    pub writer: String,
    /// The path that owns the field.
    pub owner: &'static str,
}

impl<T: Ord + Clone, O: Owner> Owned<T, O> {
    /// Writes `value` computed at `stamp` by path `writer`: `Ok(true)` if it is now the
    /// field's value, `Ok(false)` if it was older, [`NotOwner`] if `writer` does not own it.
    ///
    /// # Errors
    /// [`NotOwner`] when `writer` is not `O::PATH`.
    pub fn set(&mut self, writer: &str, value: T, stamp: Stamp) -> Result<bool, NotOwner> {
        if writer != O::PATH {
            return Err(NotOwner {
                writer: writer.to_string(),
                owner: O::PATH,
            });
        }
        Ok(self.field.set(value, stamp))
    }

    /// The value, or `None` while its owner has not set it.
    pub fn get(&self) -> Option<&T> {
        self.field.get()
    }

    /// The stamp of the write that set the value.
    pub fn stamp(&self) -> Option<Stamp> {
        self.field.stamp()
    }
}

impl<T: Ord + Clone, O: Owner> Merge for Owned<T, O> {
    fn merge(&mut self, other: &Self) {
        self.field.merge(&other.field);
    }
}

#[cfg(test)]
mod tests {
    //! The rules as joins: each merge is commutative, associative and idempotent, and any
    //! interleaving of fast writes and slow results ends in the field-wise newest state.

    use super::*;
    use proptest::prelude::*;

    struct Fast;
    impl Owner for Fast {
        const PATH: &'static str = "fast";
    }

    #[derive(Debug, Clone, Default, PartialEq)]
    struct Product {
        name: Newest<String>,
        price: Owned<u64, Fast>,
        details: Newest<String>,
        first_seen: First<u64>,
        rating_max: Max<u8>,
        tags: Union<String>,
    }
    crate::impl_merge!(Product {
        name,
        price,
        details,
        first_seen,
        rating_max,
        tags
    });

    /// One write of the catalog: the fast path at source version `stamp`, or a slow result
    /// computed from source version `stamp` (it may also carry a name and try a price,
    /// which it does not own).
    #[derive(Debug, Clone)]
    enum Write {
        Fast {
            stamp: u64,
            name: String,
            price: u64,
        },
        Slow {
            stamp: u64,
            name: Option<String>,
            details: String,
            price: Option<u64>,
            rating: u8,
            tag: String,
        },
    }

    fn write() -> impl Strategy<Value = Write> {
        prop_oneof![
            (0u64..20, "[a-c]{1,2}", 0u64..5).prop_map(|(stamp, name, price)| Write::Fast {
                stamp,
                name,
                price
            }),
            (
                0u64..20,
                proptest::option::of("[a-c]{1,2}"),
                "[x-z]{1,2}",
                proptest::option::of(0u64..5),
                0u8..10,
                "[p-r]"
            )
                .prop_map(|(stamp, name, details, price, rating, tag)| Write::Slow {
                    stamp,
                    name,
                    details,
                    price,
                    rating,
                    tag
                }),
        ]
    }

    fn apply(product: &mut Product, write: &Write) {
        match write {
            Write::Fast { stamp, name, price } => {
                product.name.set(name.clone(), *stamp);
                product
                    .price
                    .set("fast", *price, *stamp)
                    .expect("the fast path owns the price");
                product.first_seen.set(*stamp, *stamp);
            }
            Write::Slow {
                stamp,
                name,
                details,
                price,
                rating,
                tag,
            } => {
                if let Some(name) = name {
                    product.name.set(name.clone(), *stamp);
                }
                product.details.set(details.clone(), *stamp);
                if let Some(price) = price {
                    assert!(product.price.set("slow", *price, *stamp).is_err());
                }
                product.rating_max.set(*rating);
                product.tags.insert(tag.clone());
            }
        }
    }

    /// The field-wise newest state, computed directly from the writes (no merge code).
    fn expected(writes: &[Write]) -> Product {
        let newest = |candidates: Vec<(u64, String)>| candidates.into_iter().max();
        let names = writes
            .iter()
            .filter_map(|w| match w {
                Write::Fast { stamp, name, .. } => Some((*stamp, name.clone())),
                Write::Slow { stamp, name, .. } => name.clone().map(|n| (*stamp, n)),
            })
            .collect();
        let prices = writes.iter().filter_map(|w| match w {
            Write::Fast { stamp, price, .. } => Some((*stamp, *price)),
            Write::Slow { .. } => None,
        });
        let details = writes
            .iter()
            .filter_map(|w| match w {
                Write::Slow { stamp, details, .. } => Some((*stamp, details.clone())),
                Write::Fast { .. } => None,
            })
            .collect();
        let mut product = Product::default();
        if let Some((stamp, name)) = newest(names) {
            product.name.set = Some((stamp, name));
        }
        if let Some((stamp, price)) = prices.max() {
            product.price.field.set = Some((stamp, price));
        }
        if let Some((stamp, details)) = newest(details) {
            product.details.set = Some((stamp, details));
        }
        let first = writes.iter().filter_map(|w| match w {
            Write::Fast { stamp, .. } => Some(*stamp),
            Write::Slow { .. } => None,
        });
        if let Some(stamp) = first.min() {
            product.first_seen.set = Some((stamp, stamp));
        }
        product.rating_max.value = writes
            .iter()
            .filter_map(|w| match w {
                Write::Slow { rating, .. } => Some(*rating),
                Write::Fast { .. } => None,
            })
            .max();
        for w in writes {
            if let Write::Slow { tag, .. } = w {
                product.tags.insert(tag.clone());
            }
        }
        product
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_interleaving_ends_in_the_field_wise_newest_state(
            writes in proptest::collection::vec(write(), 0..24),
            order in any::<proptest::sample::Index>(),
        ) {
            // The writes in the order given, and in a shuffled order.
            let mut in_order = Product::default();
            for w in &writes {
                apply(&mut in_order, w);
            }
            let mut shuffled_writes = writes.clone();
            let n = shuffled_writes.len();
            if n > 1 {
                let mut seed = order.index(usize::MAX) as u64 | 1;
                for i in (1..n).rev() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    shuffled_writes.swap(i, (seed % (i as u64 + 1)) as usize);
                }
            }
            let mut shuffled = Product::default();
            for w in &shuffled_writes {
                apply(&mut shuffled, w);
            }
            let want = expected(&writes);
            prop_assert_eq!(&in_order, &want);
            prop_assert_eq!(&shuffled, &want);
            // Split between two copies written apart, then merged either way: the same.
            let (left, right) = shuffled_writes.split_at(n / 2);
            let (mut a, mut b) = (Product::default(), Product::default());
            left.iter().for_each(|w| apply(&mut a, w));
            right.iter().for_each(|w| apply(&mut b, w));
            let mut ab = a.clone();
            ab.merge(&b);
            let mut ba = b.clone();
            ba.merge(&a);
            prop_assert_eq!(&ab, &want);
            prop_assert_eq!(&ba, &want);
        }

        #[test]
        fn merge_is_a_join(
            xs in proptest::collection::vec(write(), 0..8),
            ys in proptest::collection::vec(write(), 0..8),
            zs in proptest::collection::vec(write(), 0..8),
        ) {
            let build = |writes: &[Write]| {
                let mut p = Product::default();
                writes.iter().for_each(|w| apply(&mut p, w));
                p
            };
            let (x, y, z) = (build(&xs), build(&ys), build(&zs));
            // Idempotent.
            let mut xx = x.clone();
            xx.merge(&x);
            prop_assert_eq!(&xx, &x);
            // Commutative.
            let (mut xy, mut yx) = (x.clone(), y.clone());
            xy.merge(&y);
            yx.merge(&x);
            prop_assert_eq!(&xy, &yx);
            // Associative.
            let mut xy_z = xy.clone();
            xy_z.merge(&z);
            let mut yz = y.clone();
            yz.merge(&z);
            let mut x_yz = x.clone();
            x_yz.merge(&yz);
            prop_assert_eq!(&xy_z, &x_yz);
        }
    }

    #[test]
    fn a_slow_result_from_an_older_source_never_overwrites_a_fresher_fast_write() {
        let mut product = Product::default();
        assert!(!product.details.is_set(), "details loading");
        product.name.set("Lamp v3".into(), 3);
        assert!(!product.name.set("lamp from v1".into(), 1));
        assert!(product.details.set("brass".into(), 1));
        assert_eq!(product.name.get().map(String::as_str), Some("Lamp v3"));
        assert_eq!(product.name.stamp(), Some(3));
        assert!(product.details.is_set());
    }

    #[test]
    fn only_the_owner_writes_an_owned_field() {
        let mut price: Owned<u64, Fast> = Owned::default();
        let refused = price.set("slow", 10, 9).unwrap_err();
        assert_eq!(refused.owner, "fast");
        assert!(refused.to_string().contains("only \"fast\""), "{refused}");
        assert_eq!(price.get(), None);
        assert_eq!(price.set("fast", 7, 1), Ok(true));
        assert_eq!(price.set("fast", 5, 0), Ok(false));
        assert_eq!(price.get(), Some(&7));
    }

    #[test]
    fn fields_survive_the_codec() {
        let mut product = Product::default();
        product.name.set("Lamp".into(), 2);
        product.price.set("fast", 30, 2).unwrap();
        product.tags.insert("lighting".into());
        let encoded =
            crate::core::codec::encode(&(&product.name, &product.price, &product.tags)).unwrap();
        let (name, price, tags): (Newest<String>, Owned<u64, Fast>, Union<String>) =
            crate::core::codec::decode("merge fields", &encoded).unwrap();
        assert_eq!(
            (name, price, tags),
            (product.name, product.price, product.tags)
        );
    }
}
