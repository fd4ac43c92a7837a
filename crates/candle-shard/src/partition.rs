//! Flat parameter buffers per dtype, padded so each of `world_size` ranks owns one equal,
//! contiguous, aligned slice; and the pieces of parameters a rank's slice holds.
//!
//! Parameters of one dtype are packed end to end in their model order; the buffer is padded
//! with zeros to a multiple of `world_size * align` elements, where `align` is the alignment in
//! bytes (16, as FSDP) divided by the element size. Rank `r` owns elements
//! `r * shard_len .. (r + 1) * shard_len`. A slice can cut through parameters: the rank sees
//! them as [`Piece`]s, and padding belongs to no piece, so it never reaches a norm, a loss or
//! the optimizer.

use std::ops::Range;

use candle::DType;

/// Bytes each rank's slice is aligned to (FSDP's choice).
pub const ALIGN_BYTES: usize = 16;

/// Where one parameter lives in its flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlatEntry {
    /// The parameter's index in the model's parameter order.
    pub param: usize,
    /// Its first element in the flat buffer.
    pub offset: usize,
    /// Its number of elements.
    pub len: usize,
}

/// The part of one parameter inside one rank's slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The parameter's index in the model's parameter order.
    pub param: usize,
    /// The elements of the parameter (flattened) the piece covers.
    pub param_range: Range<usize>,
    /// Where they sit in the rank's slice.
    pub shard_range: Range<usize>,
}

/// The flat buffer of the parameters of one dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    dtype: DType,
    entries: Vec<FlatEntry>,
    len: usize,
    padded_len: usize,
    world_size: usize,
}

impl FlatLayout {
    /// Packs parameters `(index, elements)` of `dtype` in the order given, padded for
    /// `world_size` ranks (at least 1) and [`ALIGN_BYTES`] alignment.
    pub fn new(dtype: DType, params: impl IntoIterator<Item = (usize, usize)>, world_size: usize) -> Self {
        let world_size = world_size.max(1);
        let mut offset = 0;
        let entries = params
            .into_iter()
            .map(|(param, len)| {
                let e = FlatEntry { param, offset, len };
                offset += len;
                e
            })
            .collect();
        let align = (ALIGN_BYTES / dtype.size_in_bytes()).max(1);
        let unit = world_size * align;
        let padded_len = offset.div_ceil(unit) * unit;
        Self { dtype, entries, len: offset, padded_len, world_size }
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parameters, in buffer order.
    pub fn entries(&self) -> &[FlatEntry] {
        &self.entries
    }

    /// Elements of parameters (without padding).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no parameter element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements including padding: a multiple of the world size times the alignment.
    pub fn padded_len(&self) -> usize {
        self.padded_len
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Elements per rank.
    pub fn shard_len(&self) -> usize {
        self.padded_len / self.world_size
    }

    /// The flat elements rank `rank` owns.
    pub fn shard_range(&self, rank: usize) -> Range<usize> {
        let n = self.shard_len();
        rank * n..(rank + 1) * n
    }

    /// The rank owning flat element `index` (padding included).
    pub fn owner(&self, index: usize) -> usize {
        index / self.shard_len().max(1)
    }

    /// The pieces of parameters in rank `rank`'s slice, in buffer order (padding excluded).
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        let shard = self.shard_range(rank);
        self.entries
            .iter()
            .filter_map(|e| {
                let start = e.offset.max(shard.start);
                let end = (e.offset + e.len).min(shard.end);
                (start < end).then(|| Piece {
                    param: e.param,
                    param_range: start - e.offset..end - e.offset,
                    shard_range: start - shard.start..end - shard.start,
                })
            })
            .collect()
    }
}

/// One [`FlatLayout`] per parameter dtype (and per unit, see [`Partition::by_unit`]), in
/// order of first appearance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    groups: Vec<FlatLayout>,
}

impl Partition {
    /// Partitions parameters given as `(dtype, elements)` in model order over `world_size`
    /// ranks: one flat buffer per dtype.
    pub fn new(params: &[(DType, usize)], world_size: usize) -> Self {
        Self::by_unit(params, &vec![0; params.len()], world_size)
    }

    /// As [`Partition::new`], with one flat buffer per `(unit, dtype)`, where `units[i]` is the
    /// unit of parameter `i` (for ZeRO 2, the segment whose backward completes its gradient),
    /// so that each unit is itself split equally over the ranks. A parameter without a unit
    /// entry goes to unit `usize::MAX`.
    pub fn by_unit(params: &[(DType, usize)], units: &[usize], world_size: usize) -> Self {
        let unit = |i: usize| units.get(i).copied().unwrap_or(usize::MAX);
        let mut keys: Vec<(usize, DType)> = Vec::new();
        for (i, (dtype, _)) in params.iter().enumerate() {
            if !keys.contains(&(unit(i), *dtype)) {
                keys.push((unit(i), *dtype));
            }
        }
        let groups = keys
            .into_iter()
            .map(|(u, dtype)| {
                let members = params
                    .iter()
                    .enumerate()
                    .filter(|&(i, p)| p.0 == dtype && unit(i) == u)
                    .map(|(i, p)| (i, p.1));
                FlatLayout::new(dtype, members, world_size)
            })
            .collect();
        Self { groups }
    }

    /// The flat buffers, one per dtype.
    pub fn groups(&self) -> &[FlatLayout] {
        &self.groups
    }

    /// `(group, entry)` of parameter `param`, if it is partitioned.
    pub fn locate(&self, param: usize) -> Option<(usize, FlatEntry)> {
        self.groups
            .iter()
            .enumerate()
            .find_map(|(g, layout)| layout.entries.iter().find(|e| e.param == param).map(|e| (g, *e)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn dtype() -> impl Strategy<Value = DType> {
        prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16), Just(DType::F64)]
    }

    proptest! {
        /// Every element of every parameter belongs to exactly one piece of exactly one rank,
        /// padding to none, and the slices are equal, aligned and cover the buffer.
        #[test]
        fn every_element_is_owned_exactly_once(
            sizes in prop::collection::vec(1usize..300, 1..12),
            world_size in 1usize..9,
            dtype in dtype(),
        ) {
            let layout = FlatLayout::new(dtype, sizes.iter().copied().enumerate(), world_size);
            let total: usize = sizes.iter().sum();
            prop_assert_eq!(layout.len(), total);
            prop_assert_eq!(layout.padded_len() % world_size, 0);
            prop_assert!(layout.padded_len() >= total);
            prop_assert!(layout.padded_len() - total < world_size * (ALIGN_BYTES / dtype.size_in_bytes()).max(1));
            prop_assert_eq!((layout.shard_len() * dtype.size_in_bytes()) % ALIGN_BYTES, 0);
            let mut owners: Vec<Vec<u32>> = sizes.iter().map(|&n| vec![0; n]).collect();
            let mut flat_owned = vec![0u32; layout.padded_len()];
            for rank in 0..world_size {
                let shard = layout.shard_range(rank);
                prop_assert_eq!(shard.len(), layout.shard_len());
                for piece in layout.pieces(rank) {
                    prop_assert_eq!(piece.param_range.len(), piece.shard_range.len());
                    let entry = layout.entries()[piece.param];
                    for (k, i) in piece.param_range.clone().enumerate() {
                        owners[piece.param][i] += 1;
                        let flat = entry.offset + i;
                        prop_assert_eq!(flat, shard.start + piece.shard_range.start + k);
                        prop_assert_eq!(layout.owner(flat), rank);
                        flat_owned[flat] += 1;
                    }
                }
            }
            for (p, owned) in owners.iter().enumerate() {
                prop_assert!(owned.iter().all(|&c| c == 1), "parameter {} owned {:?}", p, owned);
            }
            prop_assert!(flat_owned[total..].iter().all(|&c| c == 0), "padding belongs to no piece");
        }

        /// Cutting the packed buffer into the ranks' slices and gathering them back (through the
        /// in-process all-gather) gives the buffer back, and unpacking gives the parameters.
        #[test]
        fn gather_of_shards_is_the_whole(
            sizes in prop::collection::vec(1usize..200, 1..8),
            world_size in 1usize..6,
        ) {
            let layout = FlatLayout::new(DType::F32, sizes.iter().copied().enumerate(), world_size);
            let params: Vec<Vec<f32>> = sizes.iter().enumerate()
                .map(|(p, &n)| (0..n).map(|i| (p * 1000 + i) as f32).collect()).collect();
            let mut packed = vec![0f32; layout.padded_len()];
            for e in layout.entries() {
                packed[e.offset..e.offset + e.len].copy_from_slice(&params[e.param]);
            }
            let comms = crate::comm::LocalGroup::ranks(world_size, std::time::Duration::from_secs(30));
            let gathered: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = comms.into_iter().map(|c| {
                    let (layout, params) = (&layout, &params);
                    s.spawn(move || {
                        use crate::comm::Communicator;
                        // Each rank fills only its own slice, from the parameters' pieces.
                        let mut buffer = vec![0f32; layout.padded_len()];
                        let shard = layout.shard_range(c.rank());
                        for piece in layout.pieces(c.rank()) {
                            buffer[shard.start..][piece.shard_range.clone()]
                                .copy_from_slice(&params[piece.param][piece.param_range.clone()]);
                        }
                        c.all_gather(bytemuck::cast_slice_mut(&mut buffer)).map(|_| buffer)
                    })
                }).collect();
                handles.into_iter().map(|h| h.join().expect("no panic").expect("no failure")).collect()
            });
            for buffer in gathered {
                prop_assert_eq!(&buffer, &packed);
            }
        }
    }

    #[test]
    fn dtypes_get_their_own_buffers_and_alignment() {
        let p = Partition::new(&[(DType::F32, 5), (DType::BF16, 3), (DType::F32, 2)], 3);
        assert_eq!(p.groups().len(), 2);
        let f32s = &p.groups()[0];
        assert_eq!(
            f32s.entries(),
            &[FlatEntry { param: 0, offset: 0, len: 5 }, FlatEntry { param: 2, offset: 5, len: 2 }]
        );
        // 7 elements over 3 ranks in units of 4 f32 (16 bytes): 12 elements, 4 per rank.
        assert_eq!((f32s.padded_len(), f32s.shard_len()), (12, 4));
        assert_eq!(
            f32s.pieces(1),
            vec![
                Piece { param: 0, param_range: 4..5, shard_range: 0..1 },
                Piece { param: 2, param_range: 0..2, shard_range: 1..3 },
            ]
        );
        assert!(f32s.pieces(2).is_empty(), "rank 2 owns only padding");
        // bf16: units of 8 elements per rank.
        assert_eq!(p.groups()[1].padded_len(), 24);
        assert_eq!(p.locate(2), Some((0, FlatEntry { param: 2, offset: 5, len: 2 })));
        // By unit: parameters 0 and 2 in separate units, each padded on its own.
        let p = Partition::by_unit(&[(DType::F32, 5), (DType::BF16, 3), (DType::F32, 2)], &[1, 1, 0], 3);
        assert_eq!(p.groups().len(), 3);
        assert_eq!(p.locate(2), Some((2, FlatEntry { param: 2, offset: 0, len: 2 })));
        assert_eq!(p.groups()[2].padded_len(), 12);
    }
}
