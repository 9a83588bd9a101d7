//! A redb storage backend in memory that holds only the pages written to it.
//!
//! redb grows a database by doubling it while it fits in one region, and
//! redb's own `InMemoryBackend` is one `Vec<u8>` that fills the grown length
//! with zeros: a node's database of a few hundred KiB of live pages holds up
//! to twice that, all of it resident. [`PagedMemory`] keeps the database in
//! pages of [`PAGE`] bytes that exist only once something was written to them;
//! the rest of the length reads as zeros, and shrinking frees the pages past
//! the new end. The simulator runs thousands of nodes on in-memory stores, so
//! this is memory per node (SIMULATOR.md, "where a node's database goes").

use std::io;
use std::sync::RwLock;

use redb::StorageBackend;

/// Bytes per page; redb's own page size, so its page writes fill whole pages.
pub const PAGE: usize = 4096;

/// A database in memory, allocated a page at a time as it is written.
#[derive(Debug, Default)]
pub struct PagedMemory {
    state: RwLock<Pages>,
}

#[derive(Debug, Default)]
struct Pages {
    len: u64,
    /// Page `i` holds bytes `i * PAGE ..`; `None` reads as zeros.
    pages: Vec<Option<Box<[u8]>>>,
}

impl PagedMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many pages hold memory (were written and are inside the length).
    pub fn resident_pages(&self) -> usize {
        self.state
            .read()
            .map_or(0, |s| s.pages.iter().filter(|p| p.is_some()).count())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("in-memory database lock poisoned")
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "beyond the end of the in-memory database")
}

/// The page index and the offset in it of byte `at`.
fn locate(at: u64) -> io::Result<(usize, usize)> {
    let page = usize::try_from(at / PAGE as u64).map_err(|_| out_of_range())?;
    Ok((page, (at % PAGE as u64) as usize))
}

/// Checks that `offset .. offset + n` lies inside `len`.
fn check_range(offset: u64, n: usize, len: u64) -> io::Result<()> {
    let end = offset.checked_add(n as u64).ok_or_else(out_of_range)?;
    if end > len { Err(out_of_range()) } else { Ok(()) }
}

impl StorageBackend for PagedMemory {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.read().map_err(|_| poisoned())?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let s = self.state.read().map_err(|_| poisoned())?;
        check_range(offset, out.len(), s.len)?;
        let mut done = 0;
        while done < out.len() {
            let (page, at) = locate(offset + done as u64)?;
            let n = (PAGE - at).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match s.pages.get(page).and_then(Option::as_ref) {
                Some(p) => dst.copy_from_slice(&p[at..at + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.write().map_err(|_| poisoned())?;
        if len < s.len {
            // Pages wholly past the end go; the rest of a partial last page is
            // zeroed, so that growing again reads zeros there.
            let (last, at) = locate(len)?;
            let keep = if at == 0 { last } else { last + 1 };
            s.pages.truncate(keep);
            s.pages.shrink_to_fit();
            if at != 0
                && let Some(Some(p)) = s.pages.get_mut(last)
            {
                p[at..].fill(0);
            }
        }
        s.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.write().map_err(|_| poisoned())?;
        check_range(offset, data.len(), s.len)?;
        let mut done = 0;
        while done < data.len() {
            let (page, at) = locate(offset + done as u64)?;
            let n = (PAGE - at).min(data.len() - done);
            if s.pages.len() <= page {
                s.pages.resize_with(page + 1, || None);
            }
            let p = s.pages[page].get_or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            p[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    #[test]
    fn bytes_read_back_as_written_and_unwritten_ones_read_as_zeros() {
        let m = PagedMemory::new();
        m.set_len(5 * PAGE as u64).unwrap();
        // Across a page boundary.
        let data: Vec<u8> = (0..300u16).map(|i| i as u8 | 1).collect();
        let at = 2 * PAGE as u64 - 100;
        m.write(at, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        m.read(at, &mut back).unwrap();
        assert_eq!(back, data);
        // Only the two pages written hold memory.
        assert_eq!(m.resident_pages(), 2);
        let mut zeros = vec![7u8; 2 * PAGE];
        m.read(3 * PAGE as u64, &mut zeros).unwrap();
        assert!(zeros.iter().all(|&b| b == 0));
        let mut edge = vec![7u8; 150];
        m.read(at - 50, &mut edge).unwrap();
        assert_eq!(&edge[..50], &[0u8; 50]);
        assert_eq!(&edge[50..], &data[..100]);
    }

    #[test]
    fn reads_and_writes_past_the_end_are_refused() {
        let m = PagedMemory::new();
        m.set_len(100).unwrap();
        assert!(m.write(90, &[1u8; 11]).is_err());
        assert!(m.read(99, &mut [0u8; 2]).is_err());
        assert!(m.read(u64::MAX, &mut [0u8; 2]).is_err());
        m.write(90, &[1u8; 10]).unwrap();
        assert_eq!(m.len().unwrap(), 100);
    }

    #[test]
    fn shrinking_frees_the_pages_past_the_end_and_growing_again_reads_zeros() {
        let m = PagedMemory::new();
        m.set_len(4 * PAGE as u64).unwrap();
        m.write(0, &vec![9u8; 4 * PAGE]).unwrap();
        assert_eq!(m.resident_pages(), 4);
        let cut = PAGE as u64 + 10;
        m.set_len(cut).unwrap();
        assert_eq!(m.resident_pages(), 2);
        m.set_len(4 * PAGE as u64).unwrap();
        let mut all = vec![7u8; 4 * PAGE];
        m.read(0, &mut all).unwrap();
        assert!(all[..cut as usize].iter().all(|&b| b == 9));
        assert!(all[cut as usize..].iter().all(|&b| b == 0));
    }

    /// The backend shared with the test, to look at it under redb.
    #[derive(Debug)]
    struct Shared(std::sync::Arc<PagedMemory>);

    impl StorageBackend for Shared {
        fn len(&self) -> io::Result<u64> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.write(offset, data)
        }
    }

    #[test]
    fn a_redb_database_on_it_keeps_its_tables_and_holds_fewer_pages_than_its_length() {
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        let mem = std::sync::Arc::new(PagedMemory::new());
        let db = Database::builder().create_with_backend(Shared(mem.clone())).unwrap();
        for round in 0..20u64 {
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(T).unwrap();
                for i in 0..50 {
                    t.insert(round * 50 + i, vec![round as u8; 500].as_slice()).unwrap();
                }
            }
            w.commit().unwrap();
        }
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        assert_eq!(t.get(999).unwrap().unwrap().value(), vec![19u8; 500].as_slice());
        assert_eq!(t.get(0).unwrap().unwrap().value(), vec![0u8; 500].as_slice());
        // redb grew the database ahead of its pages; only those written hold memory.
        let len = mem.len().unwrap();
        let held = (mem.resident_pages() * PAGE) as u64;
        assert!(held < len, "{held} bytes held of {len}");
    }
}
