//! Which chunk to take from which source next: each source's view of what it has, rarest first.

use super::*;

/// What a pull knows of the serving replicas, as of the last have-byte refresh.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    /// Per chunk, the serving replicas (live, no bad chunk so far; origins not counted) that
    /// hold it or are fetching it.
    pub(crate) holders: Vec<u16>,
    /// Per chunk, the replica (of this one and the serving replicas it knows, by rendezvous
    /// hashing on agent names; as [`salt`] of its name) that takes it from an origin: replicas
    /// that know each other agree on one taker per chunk without talking, so that an origin
    /// sends each chunk about once and the replicas spread it.
    pub(crate) owner: Vec<u64>,
    /// This replica's [`salt`].
    pub(crate) me: u64,
}

/// A replica's own pseudo-random order of the chunks (by agent name).
pub(crate) fn salt(agent_name: &str) -> u64 {
    xxh3_64(agent_name.as_bytes())
}

/// Where chunk `c` comes in the order of the replica with salt `s` (smaller first).
pub(super) fn rank(c: usize, s: u64) -> u64 {
    xxh3_64_with_seed(&(c as u64).to_le_bytes(), s)
}

impl View {
    /// The view of `me` among `replicas` (agent names and have bytes).
    pub(crate) fn new(me: &str, replicas: &[(&str, &[u8])], chunks: usize) -> View {
        let mut holders = vec![0u16; chunks];
        for (_, have) in replicas {
            for (h, &b) in holders.iter_mut().zip(have.iter()) {
                if b != ABSENT {
                    *h = h.saturating_add(1);
                }
            }
        }
        let score =
            |name: &str, c: usize| (xxh3_64_with_seed(name.as_bytes(), c as u64), salt(name));
        let owner = (0..chunks)
            .map(|c| {
                std::iter::once(me)
                    .chain(replicas.iter().map(|(n, _)| *n))
                    .map(|n| score(n, c))
                    .max()
                    .map_or(0, |(_, s)| s)
            })
            .collect();
        View {
            holders,
            owner,
            me: salt(me),
        }
    }
}

/// Which kind of source a chunk is picked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum From {
    /// A replica serving what it pulled.
    Replica,
    /// An origin (complete from the start).
    Origin,
    /// An origin, after this replica's origin streams have found nothing to take for
    /// [`ENDGAME_PATIENCE`]: it helps even with another replica's last few chunks.
    OriginImpatient,
}

/// A replica leaves to their owner the last this many unheld chunks it owns (the owner's own
/// origin streams take them next; a helper would only send them twice over the origin's link,
/// which the owner has to itself by then) unless it has waited [`ENDGAME_PATIENCE`].
pub const ENDGAME_LEFT: usize = 2;

/// How long a replica's origin streams wait with nothing to take before they help with the
/// last chunks of another replica (one that is stuck or gone without being dropped yet).
pub const ENDGAME_PATIENCE: Duration = Duration::from_millis(1500);

/// The chunk to read next from one source, among `candidates` (pending here, held by that
/// source).
///
/// From a replica: the one the fewest serving replicas hold or are fetching, so that rare
/// chunks spread first and each replica soon holds something the others lack.
///
/// From an origin: only chunks no replica holds or fetches (the origin's link carries what
/// nobody else can serve); this replica's own ([`View::owner`]) first. With none of its own
/// left it helps the replica with the most left (one whose link to the origin is slower, or a
/// stuck one), taking from the back of that replica's order (the chunks it would take last,
/// so the two rarely take the same one), at an offset of its own (so that two helpers rarely
/// do either); but not with that replica's last [`ENDGAME_LEFT`] chunks (its own streams take
/// them next, with the origin's link to themselves by then: a helper would have the origin send
/// them twice), unless this replica's origin streams have waited [`ENDGAME_PATIENCE`]
/// (`From::OriginImpatient`: the owner may be stuck).
///
/// Ties go by this replica's own pseudo-random order, so that replicas picking at once from
/// stale have bytes rarely pick the same chunk (as they did sweeping forward from different
/// starts, each catching up with the next).
pub(crate) fn rarest(
    candidates: impl IntoIterator<Item = usize>,
    view: &View,
    from: From,
) -> Option<usize> {
    let held = |c: usize| view.holders.get(c).copied().unwrap_or(0);
    let owner = |c: usize| view.owner.get(c).copied().unwrap_or(view.me);
    let candidates = candidates.into_iter();
    if from == From::Replica {
        return candidates.min_by_key(|&c| (held(c), rank(c, view.me)));
    }
    let unheld: Vec<usize> = candidates.filter(|&c| held(c) == 0).collect();
    let own = unheld.iter().copied().filter(|&c| owner(c) == view.me);
    if let Some(c) = own.min_by_key(|&c| rank(c, view.me)) {
        return Some(c);
    }
    let mut left: BTreeMap<u64, usize> = BTreeMap::new();
    for &c in &unheld {
        *left.entry(owner(c)).or_default() += 1;
    }
    let (&behind, &n) = left.iter().max_by_key(|&(&o, &n)| (n, o))?;
    if n <= ENDGAME_LEFT && from == From::Origin {
        return None;
    }
    let mut theirs: Vec<usize> = unheld.into_iter().filter(|&c| owner(c) == behind).collect();
    theirs.sort_by_key(|&c| std::cmp::Reverse(rank(c, behind)));
    let k = rank(behind as usize, view.me) as usize
        % if n <= ENDGAME_LEFT {
            theirs.len()
        } else {
            (theirs.len() / 2).max(1)
        };
    theirs.get(k).copied()
}
