//! `ferry run` puts every thread on glibc's main arena (`heap::one_arena`) before it starts any, so
//! that `malloc_trim` reaches the end of the heap a burst of connections grew. A binary of its own
//! (no test harness): the setting only holds for threads started after it, and a harness would
//! start one first.

fn main() {
    ferry::heap::one_arena();
    let at = std::thread::spawn(|| {
        // Below the mmap threshold, so it comes from the thread's arena.
        let block = vec![1u8; 64 * 1024];
        block.as_ptr() as usize
    })
    .join()
    .expect("the allocating thread");
    let (lo, hi) = process_heap();
    assert!(
        (lo..hi).contains(&at),
        "a new thread allocated at {at:#x}, outside the main arena's heap {lo:#x}-{hi:#x}: it got an arena of its own"
    );
    println!("test a_thread_started_after_one_arena_allocates_from_the_main_heap ... ok");
}

/// The main arena's memory: the `[heap]` mapping, which it grows with brk.
fn process_heap() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    let line = maps
        .lines()
        .find(|l| l.ends_with("[heap]"))
        .expect("the process has a [heap] mapping");
    let range = line.split_whitespace().next().expect("an address range");
    let (lo, hi) = range.split_once('-').expect("lo-hi");
    let hex = |s| usize::from_str_radix(s, 16).expect("hex address");
    (hex(lo), hex(hi))
}
