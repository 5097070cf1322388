use super::*;

#[test]
fn send_batch_records_ranges_and_keeps_its_capacity() {
    let sge = |a: u64| IbvSge {
        addr: a,
        length: 8,
        lkey: 1,
    };
    let mut b = SendBatch::default();
    assert!(b.is_empty());
    b.push(7, WR_RDMA_WRITE, [sge(0), sge(8)], 0x1000, 42);
    b.push(8, WR_SEND, [], 0, 0);
    b.push(9, WR_RDMA_READ, [sge(16)], 0x2000, 43);
    assert_eq!(b.len(), 3);
    assert_eq!(b.ranges, vec![(0, 2), (2, 0), (2, 1)]);
    assert_eq!(b.wrs[0].num_sge, 2);
    assert_eq!(b.wrs[1].num_sge, 0);
    assert_eq!(
        (
            b.wrs[2].wr_id,
            b.wrs[2].rdma_remote_addr,
            b.wrs[2].rdma_rkey
        ),
        (9, 0x2000, 43)
    );
    assert!(b.wrs.iter().all(|w| w.send_flags == SEND_SIGNALED));
    let caps = (b.wrs.capacity(), b.sges.capacity(), b.ranges.capacity());
    for round in 0..100u64 {
        b.clear();
        b.push(round, WR_RDMA_WRITE, [sge(0), sge(8)], 0, 0);
        b.push(round, WR_RDMA_WRITE, [sge(16)], 0, 0);
    }
    assert_eq!(
        (b.wrs.capacity(), b.sges.capacity(), b.ranges.capacity()),
        caps,
        "reuse allocates nothing"
    );
}

#[test]
fn a_refused_chain_counts_what_was_posted_before_bad_wr() {
    let mut b = SendBatch::default();
    for i in 0..5 {
        b.push(i, WR_RDMA_WRITE, [], 0, 0);
    }
    let base = b.wrs.as_ptr();
    // bad_wr = the third: two were posted.
    assert_eq!(posted_before(base, base.wrapping_add(2), 5), 2);
    assert_eq!(posted_before(base, base, 5), 0);
    // Null, before the chain, misaligned or past it: read as nothing posted / all of it.
    assert_eq!(posted_before(base, std::ptr::null(), 5), 0);
    assert_eq!(posted_before(base.wrapping_add(1), base, 5), 0);
    let odd = (base as usize + 3) as *const IbvSendWr;
    assert_eq!(posted_before(base, odd, 5), 0);
    assert_eq!(posted_before(base, base.wrapping_add(9), 5), 5);
}

std::thread_local! {
    /// What the fake kind below saw, in order.
    static SEEN: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn seen() -> Vec<String> {
    SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

/// A parent that says when it is dropped.
struct Parent(&'static str);

impl Drop for Parent {
    fn drop(&mut self) {
        SEEN.with(|s| s.borrow_mut().push(format!("drop {}", self.0)));
    }
}

/// Stands in for a destroy call: records the object, fails (EIO) for object 0.
unsafe extern "C" fn fake_destroy(p: *mut u32) -> c_int {
    // SAFETY: the tests pass pointers to live u32s.
    let v = unsafe { *p };
    SEEN.with(|s| s.borrow_mut().push(format!("destroy {v}")));
    if v == 0 {
        5
    } else {
        0
    }
}

struct FakeKind;

// SAFETY: test objects are u32s on the test's stack, used on its thread only.
unsafe impl Kind for FakeKind {
    type Raw = u32;
    type Parent = Parent;
    const DESTROY: &'static str = "ibv_fake_destroy";
    fn destroy(p: &Parent) -> (unsafe extern "C" fn(*mut u32) -> c_int, &str) {
        (fake_destroy, p.0)
    }
}

#[test]
fn an_owned_object_is_destroyed_once_before_its_parent_and_a_failure_is_only_logged() {
    let (mut a, mut b) = (1u32, 0u32);
    {
        // SAFETY: live u32s, "destroyed" by nobody else.
        let _first = unsafe { Owned::<FakeKind>::new(&mut a, Parent("ctx a")) };
        // SAFETY: as above.
        let _second = unsafe { Owned::<FakeKind>::new(&mut b, Parent("ctx b")) };
        assert!(seen().is_empty());
    }
    // Locals drop in reverse order; each object goes before its parent, and the failing
    // destroy of the second does not stop the first.
    assert_eq!(
        seen(),
        ["destroy 0", "drop ctx b", "destroy 1", "drop ctx a"]
    );
}
