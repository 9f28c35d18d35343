//! Guest memory as the frontend hands it over (SET_MEM_TABLE): the table is parsed and checked,
//! each region's fd mapped shared, and frontend (QEMU) virtual addresses translated to guest
//! physical ones for SET_VRING_ADDR. Everything the daemon knows about guest memory comes from
//! here; every error names the region and carries its cause.

use std::fs::File;
use std::mem::size_of;
use std::sync::Arc;

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserMemory, VhostUserMemoryRegion};
use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{
    ByteValued, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionCollectionError,
    GuestRegionMmap,
};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("memory table of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("memory table announces {regions} regions in {len} bytes with {fds} fds")]
    Inconsistent {
        regions: usize,
        len: usize,
        fds: usize,
    },
    #[error("region at guest address {gpa:#x}: size {size:#x} is empty or overflows an address")]
    BadRegion { gpa: u64, size: u64 },
    #[error("region at guest address {gpa:#x}: size {size:#x} does not fit this host's addresses")]
    TooLarge { gpa: u64, size: u64 },
    #[error(
        "region at guest address {gpa:#x}: its file holds {have:#x} bytes, the region needs \
         {need:#x} (offset + size): touching the rest would crash the daemon"
    )]
    ShortFile { gpa: u64, need: u64, have: u64 },
    #[error("region at guest address {gpa:#x}: fstat of its file failed: {err}")]
    Stat {
        gpa: u64,
        #[source]
        err: std::io::Error,
    },
    #[error("mapping region at guest address {gpa:#x}: {err}")]
    Map {
        gpa: u64,
        #[source]
        err: MmapRegionError,
    },
    #[error("region at guest address {gpa:#x} overflows the guest address space")]
    Overflow { gpa: u64 },
    #[error("the regions do not form a guest memory map: {0}")]
    Layout(#[source] GuestRegionCollectionError),
}

/// One region as the frontend sees it: where it is in the guest and in the frontend's own
/// address space (vring addresses come in the latter).
struct Region {
    gpa: u64,
    uva: u64,
    size: u64,
}

/// The guest's memory, mapped, and the table that translates the frontend's addresses.
pub struct GuestMemory {
    mapped: Arc<GuestMemoryMmap>,
    table: Vec<Region>,
}

/// Parse a SET_MEM_TABLE body: the header, then `num_regions` regions, one fd each.
pub fn parse_table(body: &[u8], fds: usize) -> Result<Vec<VhostUserMemoryRegion>, MemoryError> {
    let hdr_len = size_of::<VhostUserMemory>();
    let reg_len = size_of::<VhostUserMemoryRegion>();
    let head = body
        .get(..hdr_len)
        .and_then(VhostUserMemory::from_slice)
        .ok_or(MemoryError::Short(body.len()))?;
    let regions = head.num_regions as usize;
    if regions == 0 || body.len() != hdr_len + regions * reg_len || regions != fds {
        return Err(MemoryError::Inconsistent {
            regions,
            len: body.len(),
            fds,
        });
    }
    body[hdr_len..]
        .chunks_exact(reg_len)
        .map(|c| {
            let r = *VhostUserMemoryRegion::from_slice(c).expect("a chunk of the region's size");
            let (size, gpa) = (r.memory_size, r.guest_phys_addr);
            let overflows = gpa.checked_add(size).is_none()
                || r.user_addr.checked_add(size).is_none()
                || r.mmap_offset.checked_add(size).is_none();
            if size == 0 || overflows {
                return Err(MemoryError::BadRegion { gpa, size });
            }
            Ok(r)
        })
        .collect()
}

/// A region's file must hold the whole region: a mapping past its end raises SIGBUS on the
/// first access, which would kill the daemon (and the kernel's accesses, readv into a guest
/// buffer, would fail with EFAULT). So the file's size is checked before mapping, and a memfd is
/// sealed against shrinking afterwards when the frontend has not done it itself (QEMU's
/// `memory-backend-memfd` seals by default): a file that can still shrink is the one way left to
/// crash the daemon from outside, and a log line says so.
fn check_file(file: &File, gpa: u64, need: u64) -> Result<(), MemoryError> {
    use crate::sys::Shrink;
    let st = crate::sys::fstat(file).map_err(|err| MemoryError::Stat { gpa, err })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        // Device memory (a character device): no size to check.
        return Ok(());
    }
    let have = u64::try_from(st.st_size).unwrap_or(0);
    if have < need {
        return Err(MemoryError::ShortFile { gpa, need, have });
    }
    match crate::sys::seal_against_shrinking(file) {
        Shrink::Sealed => {}
        Shrink::Unsealable => warn!(
            "guest memory at {gpa:#x}: its memfd cannot be sealed against shrinking; a frontend \
             that shrank it would crash the daemon"
        ),
        // A file on hugetlbfs or elsewhere: nothing prevents it from shrinking.
        Shrink::NotMemfd => log::debug!("guest memory at {gpa:#x}: a file that cannot be sealed"),
    }
    Ok(())
}

impl GuestMemory {
    /// Map every region's fd shared (the guest's RAM itself: frames are read and written in
    /// place).
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemoryError> {
        let mut mapped = Vec::with_capacity(regions.len());
        let mut table = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            let (gpa, size, uva) = (r.guest_phys_addr, r.memory_size, r.user_addr);
            let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge { gpa, size })?;
            check_file(&file, gpa, r.mmap_offset + size)?;
            let mmap = MmapRegion::from_file(FileOffset::new(file, r.mmap_offset), len)
                .map_err(|err| MemoryError::Map { gpa, err })?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(gpa))
                .ok_or(MemoryError::Overflow { gpa })?;
            mapped.push(region);
            table.push(Region { gpa, uva, size });
        }
        mapped.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mapped = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Layout)?;
        let total: u64 = table.iter().map(|r| r.size).sum();
        info!("guest memory: {} regions, {} MiB", table.len(), total >> 20);
        Ok(GuestMemory {
            mapped: Arc::new(mapped),
            table,
        })
    }

    /// The mapping, shared with the queues that point into it.
    pub fn mapped(&self) -> &Arc<GuestMemoryMmap> {
        &self.mapped
    }

    /// The first guest-physical address past every region.
    pub fn end(&self) -> u64 {
        self.table.iter().map(|r| r.gpa + r.size).max().unwrap_or(0)
    }

    /// The guest physical address of a frontend virtual address.
    pub fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        self.table
            .iter()
            .find(|r| uva >= r.uva && uva - r.uva < r.size)
            .map(|r| r.gpa + (uva - r.uva))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut body = VhostUserMemory::new(u32::try_from(regions.len()).unwrap())
            .as_slice()
            .to_vec();
        for &(gpa, size, uva, off) in regions {
            body.extend_from_slice(VhostUserMemoryRegion::new(gpa, size, uva, off).as_slice());
        }
        body
    }

    #[test]
    fn a_table_is_checked_before_anything_is_mapped() {
        let ok = table(&[(0, 0x1000, 0x7f00_0000_0000, 0)]);
        assert_eq!(parse_table(&ok, 1).unwrap().len(), 1);
        assert!(matches!(
            parse_table(&ok[..4], 1),
            Err(MemoryError::Short(4))
        ));
        assert!(matches!(
            parse_table(&ok, 2),
            Err(MemoryError::Inconsistent {
                regions: 1,
                fds: 2,
                ..
            })
        ));
        assert!(matches!(
            parse_table(&table(&[]), 0),
            Err(MemoryError::Inconsistent { regions: 0, .. })
        ));
        for bad in [
            (0, 0, 0, 0),
            (u64::MAX, 2, 0, 0),
            (0, 2, u64::MAX, 0),
            (0, 2, 0, u64::MAX),
        ] {
            assert!(
                matches!(
                    parse_table(&table(&[bad]), 1),
                    Err(MemoryError::BadRegion { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn frontend_addresses_translate_within_their_region_only() {
        let m = GuestMemory {
            mapped: Arc::new(GuestMemoryMmap::default()),
            table: vec![Region {
                gpa: 0x10_0000,
                uva: 0x7000_0000,
                size: 0x1000,
            }],
        };
        assert_eq!(m.uva_to_gpa(0x7000_0010), Some(0x10_0010));
        assert_eq!(m.uva_to_gpa(0x7000_1000), None);
        assert_eq!(m.uva_to_gpa(0x6fff_ffff), None);
    }
}
