//! Kernel loading: detects the image format, places the kernel, command
//! line and initrd in guest memory, and says how vCPU 0 must start.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{self, ApStartup, EntryState};
use crate::layout::{self, CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START};
use crate::memory::GuestRam;

/// Command line for Linux when none is given: the console on COM1 from the
/// first printk (earlycon), reboot through the keyboard controller (our
/// i8042 turns it into a poweroff), and no legacy probing that the VMM
/// does not emulate.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 earlycon=uart8250,io,0x3f8 reboot=k panic=-1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The kernel snapvm boots when none is given.
pub static EMBEDDED_GUEST: &[u8] = include_bytes!(env!("SNAPVM_GUEST_ELF"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is neither an ELF (PVH) kernel nor a bzImage")]
    UnknownFormat(String),
    #[error("ELF kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); snapvm boots ELF kernels only through PVH")]
    NoPvhEntry(String),
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line is {len} bytes, the limit is {}", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel"
    )]
    InitrdTooBig { path: String, size: u64, limit: u64 },
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    LinuxBoot(#[from] boot::linux::LinuxBootError),
}

/// Kernel image formats snapvm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF with a PVH entry note (the snapvm guest, or a Linux vmlinux).
    Elf,
    /// Linux bzImage.
    BzImage,
}

/// Recognises the format from the first bytes of the image.
pub fn detect_format(bytes: &[u8]) -> Option<KernelFormat> {
    if bytes.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    // x86 boot protocol: boot_flag 0xaa55 at 0x1fe, "HdrS" at 0x202.
    if bytes.len() >= 0x206
        && bytes[0x1fe..0x200] == [0x55, 0xaa]
        && &bytes[0x202..0x206] == b"HdrS"
    {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Whether a 64-bit ELF carries the PVH entry note (`Xen` note of type
/// XEN_ELFNOTE_PHYS32_ENTRY). Checked before handing the image to
/// linux-loader so that an ordinary executable is refused for the reason
/// that matters to the user, not for whatever the loader trips on first.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let u16_at = |off: usize| {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        elf.get(off..off + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    // ELFCLASS64, little endian.
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    for i in 0..usize::from(phnum) {
        let Some(ph) = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * usize::from(phentsize)))
        else {
            return false;
        };
        if u32_at(ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(offset), Some(size)) = (u64_at(ph + 0x08), u64_at(ph + 0x20)) else {
            continue;
        };
        let (Ok(mut pos), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            continue;
        };
        let Some(end) = pos.checked_add(size).filter(|&e| e <= elf.len()) else {
            continue;
        };
        while pos + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(pos), u32_at(pos + 4), u32_at(pos + 8))
            else {
                break;
            };
            let name_start = pos + 12;
            let (Some(name_len), Some(desc_len)) =
                (align4(namesz as usize), align4(descsz as usize))
            else {
                break;
            };
            if elf.get(name_start..name_start + namesz as usize) == Some(b"Xen\0".as_slice())
                && kind == XEN_ELFNOTE_PHYS32_ENTRY
            {
                return true;
            }
            match name_start
                .checked_add(name_len)
                .and_then(|p| p.checked_add(desc_len))
            {
                Some(next) => pos = next,
                None => break,
            }
        }
    }
    false
}

/// A kernel image in memory, with the name used in messages.
#[derive(Clone, Debug)]
pub struct KernelImage {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl KernelImage {
    pub fn from_path(path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::ReadKernel {
            path: path.display().to_string(),
            source,
        })?;
        Ok(KernelImage {
            name: path.display().to_string(),
            bytes,
        })
    }

    pub fn embedded() -> Self {
        KernelImage {
            name: "<embedded snapvm guest>".to_string(),
            bytes: EMBEDDED_GUEST.to_vec(),
        }
    }
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootConfig {
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    /// `None` picks the default for the format.
    pub cmdline: Option<String>,
}

/// Result of loading: how to start the vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: EntryState,
    pub ap_startup: ApStartup,
}

/// How the kernel was loaded and is started (a restored VM does not
/// re-enter it; the entry is kept for reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootState {
    /// Linux bzImage (else an ELF/PVH image).
    pub bz_image: bool,
    /// APs start through snapvm's paravirtual START_APS (else INIT/SIPI).
    pub paravirtual_aps: bool,
    pub entry: EntryState,
}

impl crate::component::Persist for LoadedKernel {
    type State = BootState;
    type ConstructorArgs = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<BootState, std::convert::Infallible> {
        Ok(BootState {
            bz_image: self.format == KernelFormat::BzImage,
            paravirtual_aps: self.ap_startup == ApStartup::Paravirtual,
            entry: self.entry,
        })
    }

    fn restore((): (), state: &BootState) -> Result<LoadedKernel, std::convert::Infallible> {
        Ok(LoadedKernel {
            format: if state.bz_image {
                KernelFormat::BzImage
            } else {
                KernelFormat::Elf
            },
            entry: state.entry,
            ap_startup: if state.paravirtual_aps {
                ApStartup::Paravirtual
            } else {
                ApStartup::InitSipi
            },
        })
    }
}

/// Loads the kernel, command line, initrd and boot tables into `ram`.
pub fn load(ram: &GuestRam, config: &BootConfig) -> Result<LoadedKernel, LoadError> {
    let mem = ram.memory();
    let kernel = &config.kernel;
    let format = detect_format(&kernel.bytes)
        .ok_or_else(|| LoadError::UnknownFormat(kernel.name.clone()))?;
    let initrd = match &config.initrd {
        Some(path) => Some((
            path.display().to_string(),
            std::fs::read(path).map_err(|source| LoadError::ReadInitrd {
                path: path.display().to_string(),
                source,
            })?,
        )),
        None => None,
    };
    let cmdline = config.cmdline.clone().unwrap_or_else(|| match format {
        KernelFormat::BzImage => DEFAULT_LINUX_CMDLINE.to_string(),
        KernelFormat::Elf => String::new(),
    });
    let cmdline_size = write_cmdline(ram, &cmdline)?;
    let load_err = |source| LoadError::Load {
        path: kernel.name.clone(),
        source,
    };
    let mut image = Cursor::new(kernel.bytes.as_slice());
    match format {
        KernelFormat::Elf => {
            if !has_pvh_note(&kernel.bytes) {
                return Err(LoadError::NoPvhEntry(kernel.name.clone()));
            }
            let result = Elf::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => addr.0,
                _ => return Err(LoadError::NoPvhEntry(kernel.name.clone())),
            };
            let initrd = place_initrd(ram, initrd, result.kernel_end, layout::MMIO_HOLE_START)?;
            let start_info = boot::pvh::write_start_info(mem, ram.size(), CMDLINE_ADDR, initrd)?;
            write_gdt(ram, &boot::gdt::PVH_GDT)?;
            Ok(LoadedKernel {
                format,
                entry: EntryState::Pvh32 { entry, start_info },
                ap_startup: ApStartup::Paravirtual,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut image, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let hdr = result.setup_header.unwrap_or_default();
            let limit = if hdr.initrd_addr_max != 0 {
                u64::from(hdr.initrd_addr_max) + 1
            } else {
                0x3800_0000
            };
            let initrd = place_initrd(ram, initrd, result.kernel_end, limit)?;
            let boot_params = boot::linux::write_boot_params(
                mem,
                hdr,
                ram.size(),
                CMDLINE_ADDR,
                cmdline_size,
                initrd,
            )?;
            let cr3 = boot::paging::write_identity_tables(mem)?;
            write_gdt(ram, &boot::gdt::LINUX_GDT)?;
            // The 64-bit entry of a bzImage sits 0x200 past its load address.
            Ok(LoadedKernel {
                format,
                entry: EntryState::Linux64 {
                    entry: result.kernel_load.0 + 0x200,
                    boot_params,
                    cr3,
                },
                ap_startup: ApStartup::InitSipi,
            })
        }
    }
}

/// Writes the NUL-terminated command line; returns its length without NUL.
fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<u32, LoadError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(LoadError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoadError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    ram.memory()
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))?;
    Ok(cmdline.len() as u32)
}

/// Boot GDT (and an empty IDT right after it) in guest memory, matching the
/// segment registers vcpu.rs loads.
fn write_gdt(ram: &GuestRam, gdt: &[u64]) -> Result<(), LoadError> {
    for (i, e) in gdt.iter().enumerate() {
        ram.memory()
            .write_obj(*e, GuestAddress(layout::BOOT_GDT_ADDR + i as u64 * 8))?;
    }
    ram.memory()
        .write_obj(0u64, GuestAddress(layout::BOOT_IDT_ADDR))?;
    Ok(())
}

/// Places the initrd page-aligned at the top of low RAM below `limit`, above
/// the kernel. Returns `(address, size)`.
fn place_initrd(
    ram: &GuestRam,
    initrd: Option<(String, Vec<u8>)>,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, LoadError> {
    let Some((path, bytes)) = initrd else {
        return Ok(None);
    };
    let size = bytes.len() as u64;
    let top = ram.size().min(layout::MMIO_HOLE_START).min(limit);
    let too_big = || LoadError::InitrdTooBig {
        path: path.clone(),
        size,
        limit: top,
    };
    let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    ram.memory().write_slice(&bytes, GuestAddress(addr))?;
    Ok(Some((addr, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage() -> Vec<u8> {
        let mut b = vec![0u8; 0x400];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b
    }

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect_format(b"\x7fELF\x02\x01\x01"),
            Some(KernelFormat::Elf)
        );
        assert_eq!(detect_format(&fake_bzimage()), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"hello world"), None);
        assert_eq!(detect_format(&[]), None);
        let mut no_flag = fake_bzimage();
        no_flag[0x1fe] = 0;
        assert_eq!(detect_format(&no_flag), None);
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and, optionally, a PT_NOTE
    /// holding a Xen PHYS32_ENTRY note.
    fn tiny_elf(pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let mut f = vec![0u8; 0x200];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let phdr = |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, paddr: u64, size: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&paddr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&paddr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
            f[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        phdr(&mut f, 64, 1, 0x100, 0x10_0000, 16); // PT_LOAD
        f[0x100..0x110].copy_from_slice(&[0xf4; 16]);
        if let Some(entry) = pvh_entry {
            phdr(&mut f, 120, 4, 0x180, 0, 20); // PT_NOTE
            let note = &mut f[0x180..0x194];
            note[0..4].copy_from_slice(&4u32.to_le_bytes()); // namesz
            note[4..8].copy_from_slice(&4u32.to_le_bytes()); // descsz
            note[8..12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note[12..16].copy_from_slice(b"Xen\0");
            note[16..20].copy_from_slice(&entry.to_le_bytes());
        }
        f
    }

    fn boot_elf(bytes: Vec<u8>) -> Result<LoadedKernel, LoadError> {
        let ram = GuestRam::new(16 << 20).unwrap();
        let cfg = BootConfig {
            kernel: KernelImage {
                name: "/boot/tiny.elf".into(),
                bytes,
            },
            initrd: None,
            cmdline: None,
        };
        load(&ram, &cfg)
    }

    #[test]
    fn elf_with_pvh_note_enters_32_bit() {
        let k = boot_elf(tiny_elf(Some(0x10_0008))).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.ap_startup, ApStartup::Paravirtual);
        assert_eq!(
            k.entry,
            EntryState::Pvh32 {
                entry: 0x10_0008,
                start_info: layout::PVH_START_INFO_ADDR
            }
        );
    }

    #[test]
    fn pvh_note_detection() {
        assert!(has_pvh_note(&tiny_elf(Some(0x100000))));
        assert!(!has_pvh_note(&tiny_elf(None)));
        assert!(!has_pvh_note(b"\x7fELF"));
        let mut truncated = tiny_elf(Some(0x100000));
        truncated.truncate(0x190); // cuts the note in the middle
        assert!(!has_pvh_note(&truncated));
        assert!(has_pvh_note(KernelImage::embedded().bytes.as_slice()));
    }

    #[test]
    fn elf_without_pvh_note_is_refused() {
        let e = boot_elf(tiny_elf(None)).unwrap_err();
        assert!(matches!(e, LoadError::NoPvhEntry(_)), "{e}");
        assert!(e.to_string().contains("/boot/tiny.elf"), "{e}");
        assert!(e.to_string().contains("PVH"), "{e}");
    }

    #[test]
    fn unknown_format_names_the_path() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let cfg = BootConfig {
            kernel: KernelImage {
                name: "/tmp/garbage".into(),
                bytes: b"not a kernel at all".to_vec(),
            },
            initrd: None,
            cmdline: None,
        };
        let e = load(&ram, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/tmp/garbage is neither an ELF (PVH) kernel nor a bzImage"
        );
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let cfg = BootConfig {
            kernel: KernelImage {
                name: "k".into(),
                bytes: b"\x7fELF\x02\x01\x01\x00".to_vec(),
            },
            initrd: None,
            cmdline: None,
        };
        assert!(load(&ram, &cfg).is_err());
    }

    #[test]
    fn cmdline_limits() {
        let ram = GuestRam::new(16 << 20).unwrap();
        assert!(write_cmdline(&ram, &"x".repeat(CMDLINE_MAX_SIZE)).is_err());
        assert!(write_cmdline(&ram, "a\0b").is_err());
        assert_eq!(write_cmdline(&ram, "mode=counter").unwrap(), 12);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let placed = place_initrd(&ram, Some(("i".into(), vec![1; 5000])), 2 << 20, u64::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(placed.0 % 4096, 0);
        assert!(placed.0 + placed.1 <= 64 << 20);
        assert!(place_initrd(
            &ram,
            Some(("i".into(), vec![1; 63 << 20])),
            2 << 20,
            u64::MAX
        )
        .is_err());
    }
}
