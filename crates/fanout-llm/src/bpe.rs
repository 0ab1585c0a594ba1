//! Token counting with tiktoken's vocabularies, splitting patterns and merge rule, over a compact
//! table.
//!
//! tiktoken-rs's `CoreBPE` keeps an encoder map, a decoder map and a sorted copy of every token
//! as separate heap allocations, plus 128 clones of its regex: about 46 MiB for `o200k_base`,
//! more than a whole worker should use (DESIGN.md: ≤ 40 MiB with 1,000 calls in flight). Counting
//! needs only "bytes → rank", so [`Encoding`] keeps the tokens in one byte arena with an
//! open-addressing index of `u32`s: about 5 MiB for `o200k_base`. The vocabulary is read out of
//! tiktoken-rs's own `CoreBPE`, built once on a short-lived thread and dropped, so the counts are
//! tiktoken-rs's counts (the tests compare them on varied text).

use std::hash::Hasher;

use fancy_regex::Regex;
use rustc_hash::FxHasher;

type Rank = u32;

/// Pre-tokenizer of `cl100k_base` (tiktoken-rs inlines it in `cl100k_base()`).
const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

/// Special tokens are never produced by the splitting pattern; they stay out of the table.
const SPECIAL: [&str; 5] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|endofprompt|>",
];

/// Pieces at least this long use the heap-based merge (as tiktoken does), so a long run of
/// whitespace or punctuation costs O(n log n), not O(n²).
const LARGE_PIECE: usize = 100;

/// One BPE vocabulary: the ordinary tokens by rank and the pattern that splits text into pieces.
pub(crate) struct Encoding {
    pattern: Regex,
    /// Every token's bytes, back to back, in rank order.
    bytes: Vec<u8>,
    /// Where token `r` starts in `bytes`; `starts[r + 1]` is where it ends.
    starts: Vec<u32>,
    /// Open addressing by the hash of a token's bytes: `rank + 1`, or 0 for an empty slot.
    slots: Vec<u32>,
}

impl std::fmt::Debug for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoding")
            .field("tokens", &(self.starts.len() - 1))
            .finish_non_exhaustive()
    }
}

impl Encoding {
    /// `o200k_base` (gpt-4o, gpt-4.1, gpt-5, o-series).
    pub(crate) fn o200k_base() -> Self {
        Self::from_tiktoken(tiktoken_rs::o200k_base, tiktoken_rs::O200K_BASE_PAT_STR)
    }

    /// `cl100k_base` (gpt-4, gpt-3.5 and unknown models).
    pub(crate) fn cl100k_base() -> Self {
        Self::from_tiktoken(tiktoken_rs::cl100k_base, CL100K_PATTERN)
    }

    fn from_tiktoken<E: std::fmt::Debug>(
        build: fn() -> Result<tiktoken_rs::CoreBPE, E>,
        pattern: &str,
    ) -> Self {
        // The `CoreBPE` lives and dies on its own thread: its ~600,000 small allocations land in
        // that thread's malloc arena, which goes back to the system when it is dropped. What we
        // keep is allocated first, as a few large blocks (mapped on their own, and only the
        // pages written count): allocated after the `CoreBPE`, they would sit on top of its
        // freed memory and keep it resident (measured: 33 MiB instead of 10 MiB).
        let (bytes, starts) = std::thread::scope(|s| {
            s.spawn(|| {
                let mut bytes = Vec::with_capacity(4 << 20);
                let mut starts = Vec::with_capacity(400_000);
                let bpe = build().expect("tiktoken-rs's embedded vocabulary parses");
                // Ordinary ranks are 0..n without gaps; the first rank that does not decode ends
                // them (special tokens sit above, after a gap).
                for rank in 0.. {
                    let Ok(token) = bpe.decode_bytes(&[rank]) else {
                        break;
                    };
                    if SPECIAL.iter().any(|s| s.as_bytes() == token.as_slice()) {
                        break;
                    }
                    starts.push(u32::try_from(bytes.len()).expect("vocabulary under 4 GiB"));
                    bytes.extend_from_slice(&token);
                }
                starts.push(u32::try_from(bytes.len()).expect("vocabulary under 4 GiB"));
                (bytes, starts)
            })
            .join()
            .expect("building the vocabulary")
        });
        let pattern = Regex::new(pattern).expect("tiktoken's splitting pattern compiles");
        Self::new(pattern, bytes, starts)
    }

    fn new(pattern: Regex, bytes: Vec<u8>, starts: Vec<u32>) -> Self {
        let tokens = starts.len() - 1;
        // At most ~40% full, so probes stay short.
        let capacity = (tokens * 5 / 2).next_power_of_two();
        let mut encoding = Self {
            pattern,
            bytes,
            starts,
            slots: vec![0; capacity],
        };
        for rank in 0..tokens as Rank {
            let mask = encoding.slots.len() - 1;
            let mut i = hash(encoding.token(rank)) & mask;
            while encoding.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            encoding.slots[i] = rank + 1;
        }
        encoding
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    fn rank(&self, piece: &[u8]) -> Option<Rank> {
        let mask = self.slots.len() - 1;
        let mut i = hash(piece) & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if self.token(slot - 1) == piece {
                return Some(slot - 1);
            }
            i = (i + 1) & mask;
        }
    }

    fn rank_or_max(&self, piece: &[u8]) -> Rank {
        self.rank(piece).unwrap_or(Rank::MAX)
    }

    /// Tokens of `text`, special-token text counted as plain text (tiktoken's
    /// `encode_ordinary(text).len()`).
    pub(crate) fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        let mut end = 0;
        for found in self.pattern.find_iter(text) {
            match found {
                Ok(m) => {
                    tokens += self.count_piece(m.as_str().as_bytes());
                    end = m.end();
                }
                // The pattern's backtracking gave up (fancy-regex's limit): the rest counts as
                // one piece, which can only make the estimate larger.
                Err(_) => {
                    tokens += self.count_piece(&text.as_bytes()[end..]);
                    break;
                }
            }
        }
        tokens
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        match piece.len() {
            0 => 0,
            _ if self.rank(piece).is_some() => 1,
            n if n < LARGE_PIECE => self.merge_small(piece),
            _ => self.merge_large(piece),
        }
    }

    /// tiktoken's `_byte_pair_merge`: repeatedly merge the adjacent pair of lowest rank.
    fn merge_small(&self, piece: &[u8]) -> usize {
        // (start, rank of the pair starting here)
        let mut parts: Vec<(usize, Rank)> = Vec::with_capacity(piece.len() + 1);
        let mut min_rank: (Rank, usize) = (Rank::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.rank_or_max(&piece[i..i + 2]);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, Rank::MAX));
        parts.push((piece.len(), Rank::MAX));
        let get_rank = |parts: &[(usize, Rank)], i: usize| {
            if i + 3 < parts.len() {
                self.rank_or_max(&piece[parts[i].0..parts[i + 3].0])
            } else {
                Rank::MAX
            }
        };
        while min_rank.0 != Rank::MAX {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, i - 1);
            }
            parts[i].1 = get_rank(&parts, i);
            parts.remove(i + 1);
            min_rank = (Rank::MAX, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        parts.len() - 1
    }

    /// tiktoken's `_byte_pair_merge_large`: the same merges in the same order, driven by a heap.
    fn merge_large(&self, piece: &[u8]) -> usize {
        use std::collections::BinaryHeap;

        struct State {
            prev: usize,
            end: usize,
            next_end: usize,
            next_rank: Rank,
        }
        /// Lowest rank first, then leftmost.
        #[derive(PartialEq, Eq)]
        struct Merge {
            start: usize,
            rank: Rank,
        }
        impl Ord for Merge {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                other
                    .rank
                    .cmp(&self.rank)
                    .then_with(|| other.start.cmp(&self.start))
            }
        }
        impl PartialOrd for Merge {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        let mut state = Vec::with_capacity(piece.len());
        state.push(State {
            prev: usize::MAX,
            end: 1,
            next_end: 2,
            next_rank: Rank::MAX,
        });
        let mut heap = BinaryHeap::with_capacity(piece.len());
        for i in 0..piece.len() - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Merge { start: i, rank });
                state[i].next_rank = rank;
            }
            state.push(State {
                prev: i,
                end: i + 2,
                next_end: i + 3,
                next_rank: Rank::MAX,
            });
        }
        let potential_merge =
            |state: &mut [State], heap: &mut BinaryHeap<Merge>, start: usize, next_end: usize| {
                state[start].next_end = next_end;
                state[start].next_rank = Rank::MAX;
                if next_end <= piece.len()
                    && let Some(rank) = self.rank(&piece[start..next_end])
                {
                    heap.push(Merge { start, rank });
                    state[start].next_rank = rank;
                }
            };
        while let Some(left) = heap.pop() {
            if left.rank == Rank::MAX {
                break;
            }
            if left.rank != state[left.start].next_rank {
                continue;
            }
            let left_start = left.start;
            let right_start = state[left_start].end;
            let right_end = state[left_start].next_end;
            let right_next_end = state[right_start].next_end;
            state[left_start].end = right_end;
            potential_merge(&mut state, &mut heap, left_start, right_next_end);
            if right_end < state.len() {
                state[right_end].prev = left_start;
            }
            if left_start > 0 {
                let prev_start = state[left_start].prev;
                potential_merge(&mut state, &mut heap, prev_start, right_end);
            }
            state[right_start].next_rank = Rank::MAX;
        }
        let (mut tokens, mut i) = (0, 0);
        while i < state.len() {
            tokens += 1;
            i = state[i].end;
        }
        tokens
    }
}

fn hash(bytes: &[u8]) -> usize {
    let mut h = FxHasher::default();
    h.write(bytes);
    h.finish() as usize
}
