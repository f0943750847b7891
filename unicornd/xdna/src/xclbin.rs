//! The xclbin container (XRT's `xclbin.h`, `struct axlf`), read as hostile input.
//!
//! Layout: `struct axlf` = magic "xclbin2\0" (0), signature length (8), reserved[28] (12), key
//! block[256] (40), unique id (296), `struct axlf_header` (304, 152 bytes: length at +0,
//! version patch/major/minor at +24/+26/+27, mode +28, action mask +30, interface uuid +32,
//! platform VBNV +48, uuid +112, debug bin +128, number of sections +144), then the 40-byte
//! section headers {kind u32, name[16], offset u64 (+24), size u64 (+32)} from byte 456.
//!
//! Sections read: IP_LAYOUT (8: `ip_layout` = i32 count, `ip_data[]` of 80 bytes from +8),
//! AIE_PARTITION (32: `aie_partition`, 184 bytes, with its PDIs and CDO groups addressed by
//! `array_offset`s relative to the section) and PDI (18, kept as raw bytes).
//!
//! Every offset, size and count is checked with overflow-safe arithmetic against the bytes
//! present before anything is read or allocated; sections must be 8-byte aligned, inside the
//! file, and must not overlap each other or the header. Errors are [`XclbinError`], never
//! panics (`fuzz/` runs this parser under libFuzzer; `tests/xclbin.rs` mutates files).

use std::fmt;

pub const MAGIC: &[u8; 8] = b"xclbin2\0";
const HEADER_OFFSET: usize = 304;
const NUM_SECTIONS_OFFSET: usize = HEADER_OFFSET + 144;
/// Where the section headers start (`sizeof(struct axlf)` without its one-element array).
pub const SECTIONS_OFFSET: usize = 456;
pub const SECTION_HEADER_SIZE: usize = 40;
/// `XCLBIN_MAX_NUM_SECTION`.
pub const MAX_SECTIONS: u32 = 0x10000;

/// `enum axlf_section_kind` values this crate reads.
pub mod kind {
    pub const MEM_TOPOLOGY: u32 = 6;
    pub const IP_LAYOUT: u32 = 8;
    pub const PDI: u32 = 18;
    pub const AIE_METADATA: u32 = 25;
    pub const AIE_PARTITION: u32 = 32;
}

/// `IP_PS_KERNEL` in `enum IP_TYPE`.
pub const IP_PS_KERNEL: u32 = 7;
/// `ST_DPU` in `enum PS_SUBTYPE`.
pub const ST_DPU: u32 = 1;

const IP_DATA_SIZE: usize = 80;
const AIE_PARTITION_SIZE: usize = 184;
const AIE_PDI_SIZE: usize = 96;
const CDO_GROUP_SIZE: usize = 96;

/// Why an xclbin was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XclbinError {
    #[error("{0} bytes is too short for an xclbin header ({SECTIONS_OFFSET} bytes)")]
    TooShort(usize),
    #[error("bad magic (not \"xclbin2\")")]
    Magic,
    #[error("header length {length} is outside the {have} bytes present")]
    Length { length: u64, have: usize },
    #[error("{0} sections exceed the limit of {MAX_SECTIONS}")]
    TooManySections(u32),
    #[error("the section table of {count} entries ends past byte {length}")]
    SectionTable { count: u32, length: u64 },
    #[error("section {index} ({kind}) at {offset}+{size} lies outside the file ({length} bytes)")]
    SectionBounds { index: usize, kind: u32, offset: u64, size: u64, length: u64 },
    #[error("section {index} ({kind}) at offset {offset} is not 8-byte aligned")]
    SectionAlign { index: usize, kind: u32, offset: u64 },
    #[error("sections {a} and {b} overlap")]
    Overlap { a: usize, b: usize },
    #[error("section {index} overlaps the header or section table")]
    OverlapsHeader { index: usize },
    #[error("{what}: {reason}")]
    Section { what: &'static str, reason: String },
    #[error("no {0} section")]
    Missing(&'static str),
    #[error("{0} sections of kind {1}; exactly one is allowed")]
    Duplicate(usize, u32),
    #[error("compute unit {name:?} (kernel id {kernel_id}) has no PDI listing it")]
    NoPdiForCu { name: String, kernel_id: u32 },
}

type Result<T> = std::result::Result<T, XclbinError>;

/// A section header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: u32,
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// An `ip_data` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpData {
    pub ip_type: u32,
    pub properties: u32,
    pub base_address: u64,
    pub name: String,
}

impl IpData {
    /// `ps_kernel.m_subtype` (bits 0-1).
    pub fn subtype(&self) -> u32 {
        self.properties & 0x3
    }
    /// `ps_kernel.m_functional` (bits 4-5): 0 DPU, 1 pre/post.
    pub fn functional(&self) -> u32 {
        (self.properties >> 4) & 0x3
    }
    /// `ps_kernel.m_kernel_id` (bits 16-27).
    pub fn kernel_id(&self) -> u32 {
        (self.properties >> 16) & 0xfff
    }
    /// A DPU compute unit the NPU runs.
    pub fn is_dpu_cu(&self) -> bool {
        self.ip_type == IP_PS_KERNEL && self.subtype() == ST_DPU
    }
}

/// A `cdo_group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CdoGroup {
    pub name: String,
    pub cdo_type: u8,
    pub pdi_id: u64,
    pub kernel_ids: Vec<u64>,
    pub pre_cdo_groups: Vec<u32>,
}

/// An `aie_pdi`.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdi {
    pub uuid: [u8; 16],
    pub image: Vec<u8>,
    pub cdo_groups: Vec<CdoGroup>,
}

impl fmt::Debug for Pdi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pdi")
            .field("uuid", &self.uuid)
            .field("image_bytes", &self.image.len())
            .field("cdo_groups", &self.cdo_groups)
            .finish()
    }
}

/// The `aie_partition` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AiePartition {
    pub schema_version: u8,
    pub name: String,
    pub ops_per_cycle: u32,
    pub inference_fingerprint: u64,
    pub pre_post_fingerprint: u64,
    pub column_width: u16,
    pub start_columns: Vec<u16>,
    pub pdis: Vec<Pdi>,
    pub kernel_commit_id: String,
}

/// A compute unit: an IP_LAYOUT DPU kernel and the PDI that implements it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComputeUnit {
    pub name: String,
    pub kernel_id: u32,
    /// `cu_func` for CONFIG_CU (the `m_functional` field).
    pub func: u8,
    /// Index into [`AiePartition::pdis`].
    pub pdi: usize,
}

/// A parsed xclbin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xclbin {
    pub length: u64,
    pub version: (u8, u8, u16),
    pub uuid: [u8; 16],
    pub sections: Vec<Section>,
    pub ip_layout: Vec<IpData>,
    pub partition: Option<AiePartition>,
}

/// Little-endian reads that fail instead of panicking.
#[derive(Clone, Copy)]
struct Bytes<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Bytes<'a> {
    fn err(&self, reason: String) -> XclbinError {
        XclbinError::Section { what: self.what, reason }
    }
    fn slice(&self, off: u64, len: u64) -> Result<&'a [u8]> {
        let end = off.checked_add(len);
        match end {
            Some(end) if end <= self.b.len() as u64 => Ok(&self.b[off as usize..end as usize]),
            _ => Err(self.err(format!("{len} bytes at {off} run past {} bytes", self.b.len()))),
        }
    }
    fn u8(&self, off: u64) -> Result<u8> {
        Ok(self.slice(off, 1)?[0])
    }
    fn u16(&self, off: u64) -> Result<u16> {
        let s = self.slice(off, 2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&self, off: u64) -> Result<u32> {
        let s = self.slice(off, 4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&self, off: u64) -> Result<u64> {
        let s = self.slice(off, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// `array_offset` {u32 count, u32 offset} at `off`, for elements of `elem` bytes: the
    /// elements' bytes, checked to lie inside.
    fn array(&self, off: u64, elem: u64, what: &str) -> Result<(u32, &'a [u8])> {
        self.array_at(self.u32(off)?, self.u32(off + 4)?, elem, what)
    }
    /// A NUL-terminated string at `off` (an `mpo_` offset), read up to the section end.
    fn cstr_at(&self, off: u32) -> Result<String> {
        let rest = self.slice(u64::from(off), 0).map(|_| &self.b[off as usize..])?;
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| self.err(format!("string at {off} is not NUL-terminated")))?;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

/// A fixed-size name field: bytes up to the first NUL.
fn fixed_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Xclbin {
    /// Parses and checks `data`.
    pub fn parse(data: &[u8]) -> Result<Xclbin> {
        if data.len() < SECTIONS_OFFSET {
            return Err(XclbinError::TooShort(data.len()));
        }
        if &data[..8] != MAGIC {
            return Err(XclbinError::Magic);
        }
        let top = Bytes { b: data, what: "header" };
        let length = top.u64(HEADER_OFFSET as u64)?;
        if length > data.len() as u64 || length < SECTIONS_OFFSET as u64 {
            return Err(XclbinError::Length { length, have: data.len() });
        }
        let file = &data[..length as usize];
        let top = Bytes { b: file, what: "header" };
        let version = (
            top.u8(HEADER_OFFSET as u64 + 26)?,
            top.u8(HEADER_OFFSET as u64 + 27)?,
            top.u16(HEADER_OFFSET as u64 + 24)?,
        );
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(top.slice(HEADER_OFFSET as u64 + 112, 16)?);
        let count = top.u32(NUM_SECTIONS_OFFSET as u64)?;
        if count > MAX_SECTIONS {
            return Err(XclbinError::TooManySections(count));
        }
        let table_end = SECTIONS_OFFSET as u64 + u64::from(count) * SECTION_HEADER_SIZE as u64;
        if table_end > length {
            return Err(XclbinError::SectionTable { count, length });
        }
        let mut sections = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let at = (SECTIONS_OFFSET + index * SECTION_HEADER_SIZE) as u64;
            let kind = top.u32(at)?;
            let name = fixed_str(top.slice(at + 4, 16)?);
            let offset = top.u64(at + 24)?;
            let size = top.u64(at + 32)?;
            match offset.checked_add(size) {
                Some(end) if end <= length => {}
                _ => return Err(XclbinError::SectionBounds { index, kind, offset, size, length }),
            }
            if size > 0 && offset % 8 != 0 {
                return Err(XclbinError::SectionAlign { index, kind, offset });
            }
            if size > 0 && offset < table_end {
                return Err(XclbinError::OverlapsHeader { index });
            }
            sections.push(Section { kind, name, offset, size });
        }
        // Overlaps: sort the non-empty sections by offset; each must end before the next.
        let mut order: Vec<usize> = (0..sections.len()).filter(|&i| sections[i].size > 0).collect();
        order.sort_by_key(|&i| sections[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&sections[w[0]], &sections[w[1]]);
            if a.offset + a.size > b.offset {
                return Err(XclbinError::Overlap { a: w[0].min(w[1]), b: w[0].max(w[1]) });
            }
        }
        let mut x =
            Xclbin { length, version, uuid, sections, ip_layout: Vec::new(), partition: None };
        if let Some(s) = x.unique(kind::IP_LAYOUT)? {
            x.ip_layout = parse_ip_layout(x.bytes_of(file, &s, "IP_LAYOUT"))?;
        }
        if let Some(s) = x.unique(kind::AIE_PARTITION)? {
            x.partition = Some(parse_partition(x.bytes_of(file, &s, "AIE_PARTITION"))?);
        }
        Ok(x)
    }

    fn bytes_of<'a>(&self, file: &'a [u8], s: &Section, what: &'static str) -> Bytes<'a> {
        // Bounds were checked when the section table was read.
        Bytes { b: &file[s.offset as usize..(s.offset + s.size) as usize], what }
    }

    /// The one section of `kind`, if any; two or more is an error.
    fn unique(&self, kind: u32) -> Result<Option<Section>> {
        let found: Vec<&Section> = self.sections.iter().filter(|s| s.kind == kind).collect();
        match found.len() {
            0 => Ok(None),
            1 => Ok(Some(found[0].clone())),
            n => Err(XclbinError::Duplicate(n, kind)),
        }
    }

    /// The compute units the NPU runs (IP_LAYOUT entries of type IP_PS_KERNEL, subtype DPU),
    /// each with the PDI whose CDO groups list its kernel id.
    pub fn compute_units(&self) -> Result<Vec<ComputeUnit>> {
        let part = self.partition.as_ref().ok_or(XclbinError::Missing("AIE_PARTITION"))?;
        let mut cus = Vec::new();
        for ip in self.ip_layout.iter().filter(|ip| ip.is_dpu_cu()) {
            let kid = ip.kernel_id();
            let pdi = part
                .pdis
                .iter()
                .position(|p| p.cdo_groups.iter().any(|g| g.kernel_ids.contains(&u64::from(kid))))
                .ok_or_else(|| XclbinError::NoPdiForCu { name: ip.name.clone(), kernel_id: kid })?;
            cus.push(ComputeUnit {
                name: ip.name.clone(),
                kernel_id: kid,
                func: ip.functional() as u8,
                pdi,
            });
        }
        if cus.is_empty() {
            return Err(XclbinError::Missing("DPU compute unit in IP_LAYOUT"));
        }
        Ok(cus)
    }
}

fn parse_ip_layout(b: Bytes<'_>) -> Result<Vec<IpData>> {
    let count = b.u32(0)? as i32;
    if count < 0 {
        return Err(b.err(format!("negative count {count}")));
    }
    let need = 8u64 + count as u64 * IP_DATA_SIZE as u64;
    if need > b.b.len() as u64 {
        return Err(
            b.err(format!("{count} entries need {need} bytes, the section has {}", b.b.len()))
        );
    }
    (0..count as u64)
        .map(|i| {
            let at = 8 + i * IP_DATA_SIZE as u64;
            Ok(IpData {
                ip_type: b.u32(at)?,
                properties: b.u32(at + 4)?,
                base_address: b.u64(at + 8)?,
                name: fixed_str(b.slice(at + 16, 64)?),
            })
        })
        .collect()
}

fn parse_partition(b: Bytes<'_>) -> Result<AiePartition> {
    if b.b.len() < AIE_PARTITION_SIZE {
        return Err(b.err(format!("{} bytes, at least {AIE_PARTITION_SIZE} needed", b.b.len())));
    }
    let (_, cols) = b.array(32 + 8, 2, "start columns")?;
    let start_columns = cols.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let (n_pdi, pdi_bytes) = b.array(120, AIE_PDI_SIZE as u64, "PDIs")?;
    let mut pdis = Vec::with_capacity(n_pdi as usize);
    for p in pdi_bytes.chunks_exact(AIE_PDI_SIZE) {
        let pb = Bytes { b: p, what: "AIE_PARTITION PDI" };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&p[..16]);
        // The arrays are relative to the section, not to the PDI entry.
        let (_, image) = b.array_at(pb.u32(16)?, pb.u32(20)?, 1, "PDI image")?;
        let (_, groups) =
            b.array_at(pb.u32(24)?, pb.u32(28)?, CDO_GROUP_SIZE as u64, "CDO groups")?;
        let mut cdo_groups = Vec::new();
        for g in groups.chunks_exact(CDO_GROUP_SIZE) {
            let gb = Bytes { b: g, what: "CDO group" };
            let (_, ids) = b.array_at(gb.u32(16)?, gb.u32(20)?, 8, "DPU kernel ids")?;
            let (_, pre) = b.array_at(gb.u32(24)?, gb.u32(28)?, 4, "pre CDO groups")?;
            let mut id8 = [0u8; 8];
            cdo_groups.push(CdoGroup {
                name: b.cstr_at(gb.u32(0)?)?,
                cdo_type: gb.u8(4)?,
                pdi_id: gb.u64(8)?,
                kernel_ids: ids
                    .chunks_exact(8)
                    .map(|c| {
                        id8.copy_from_slice(c);
                        u64::from_le_bytes(id8)
                    })
                    .collect(),
                pre_cdo_groups: pre
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            });
        }
        pdis.push(Pdi { uuid, image: image.to_vec(), cdo_groups });
    }
    Ok(AiePartition {
        schema_version: b.u8(0)?,
        name: b.cstr_at(b.u32(4)?)?,
        ops_per_cycle: b.u32(8)?,
        inference_fingerprint: b.u64(16)?,
        pre_post_fingerprint: b.u64(24)?,
        column_width: b.u16(32)?,
        start_columns,
        pdis,
        kernel_commit_id: match b.u32(128)? {
            0 => String::new(),
            off => b.cstr_at(off)?,
        },
    })
}

impl<'a> Bytes<'a> {
    /// An `array_offset` given as its two fields.
    fn array_at(&self, count: u32, at: u32, elem: u64, what: &str) -> Result<(u32, &'a [u8])> {
        let len = u64::from(count)
            .checked_mul(elem)
            .ok_or_else(|| self.err(format!("{what}: {count} entries overflow")))?;
        let s = self.slice(u64::from(at), len).map_err(|_| {
            self.err(format!("{what}: {count} entries at {at} run past the section"))
        })?;
        Ok((count, s))
    }
}

/// The checks a fuzz target and the corpus test run on any input: parsing returns a value or
/// an error, and a parsed file's sections, compute units and PDIs are consistent with it.
pub fn check_invariants(data: &[u8]) {
    let Ok(x) = Xclbin::parse(data) else { return };
    assert!(x.length as usize <= data.len());
    for s in &x.sections {
        assert!(s.offset + s.size <= x.length);
    }
    if let Ok(cus) = x.compute_units() {
        let part = x.partition.as_ref().expect("compute units need a partition");
        for cu in cus {
            assert!(cu.pdi < part.pdis.len());
        }
    }
    let _ = format!("{x:?}");
}

/// Builds xclbin files: the test suites' well-formed and corrupted inputs and the fuzz seeds.
/// Not a replacement for `xclbinutil`: it writes only what this crate reads.
pub mod build {
    use super::*;

    /// A compute unit entry for IP_LAYOUT.
    pub fn dpu_cu(name: &str, kernel_id: u32, func: u32) -> IpData {
        IpData {
            ip_type: IP_PS_KERNEL,
            properties: ST_DPU | (func & 3) << 4 | (kernel_id & 0xfff) << 16,
            base_address: 0,
            name: name.to_owned(),
        }
    }

    fn put_name(out: &mut Vec<u8>, name: &str, len: usize) {
        let mut b = name.as_bytes().to_vec();
        b.truncate(len - 1);
        b.resize(len, 0);
        out.extend(b);
    }

    pub fn ip_layout(ips: &[IpData]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend((ips.len() as u32).to_le_bytes());
        out.extend([0u8; 4]);
        for ip in ips {
            out.extend(ip.ip_type.to_le_bytes());
            out.extend(ip.properties.to_le_bytes());
            out.extend(ip.base_address.to_le_bytes());
            put_name(&mut out, &ip.name, 64);
        }
        out
    }

    /// An AIE_PARTITION section: the fixed struct, then the start columns, the PDIs, their CDO
    /// groups, kernel ids, images and strings, each 8-byte aligned.
    pub fn aie_partition(p: &AiePartition) -> Vec<u8> {
        let mut tail: Vec<u8> = Vec::new();
        let base = AIE_PARTITION_SIZE;
        let pad8 = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(8), 0);
        let place = |tail: &mut Vec<u8>, bytes: &[u8]| -> u32 {
            let at = base + tail.len();
            tail.extend(bytes);
            pad8(tail);
            at as u32
        };
        let cstr = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            v
        };
        let name_at = place(&mut tail, &cstr(&p.name));
        let commit_at = place(&mut tail, &cstr(&p.kernel_commit_id));
        let cols: Vec<u8> = p.start_columns.iter().flat_map(|c| c.to_le_bytes()).collect();
        let cols_at = place(&mut tail, &cols);
        // PDI entries refer to images and groups placed after them: build those first.
        let mut pdi_entries = Vec::new();
        for pdi in &p.pdis {
            let image_at = place(&mut tail, &pdi.image);
            let mut groups = Vec::new();
            for g in &pdi.cdo_groups {
                let gname = place(&mut tail, &cstr(&g.name));
                let ids: Vec<u8> = g.kernel_ids.iter().flat_map(|i| i.to_le_bytes()).collect();
                let ids_at = place(&mut tail, &ids);
                let pre: Vec<u8> = g.pre_cdo_groups.iter().flat_map(|i| i.to_le_bytes()).collect();
                let pre_at = place(&mut tail, &pre);
                let mut e = Vec::new();
                e.extend(gname.to_le_bytes());
                e.push(g.cdo_type);
                e.extend([0u8; 3]);
                e.extend(g.pdi_id.to_le_bytes());
                e.extend((g.kernel_ids.len() as u32).to_le_bytes());
                e.extend(ids_at.to_le_bytes());
                e.extend((g.pre_cdo_groups.len() as u32).to_le_bytes());
                e.extend(pre_at.to_le_bytes());
                e.resize(CDO_GROUP_SIZE, 0);
                groups.extend(e);
            }
            let groups_at = place(&mut tail, &groups);
            let mut e = pdi.uuid.to_vec();
            e.extend((pdi.image.len() as u32).to_le_bytes());
            e.extend(image_at.to_le_bytes());
            e.extend((pdi.cdo_groups.len() as u32).to_le_bytes());
            e.extend(groups_at.to_le_bytes());
            e.resize(AIE_PDI_SIZE, 0);
            pdi_entries.extend(e);
        }
        let pdis_at = place(&mut tail, &pdi_entries);
        let mut out = Vec::with_capacity(base + tail.len());
        out.push(p.schema_version);
        out.extend([0u8; 3]);
        out.extend(name_at.to_le_bytes());
        out.extend(p.ops_per_cycle.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend(p.inference_fingerprint.to_le_bytes());
        out.extend(p.pre_post_fingerprint.to_le_bytes());
        // aie_partition_info at 32
        out.extend(p.column_width.to_le_bytes());
        out.extend([0u8; 6]);
        out.extend((p.start_columns.len() as u32).to_le_bytes());
        out.extend(cols_at.to_le_bytes());
        out.resize(32 + 88, 0);
        out.extend((p.pdis.len() as u32).to_le_bytes());
        out.extend(pdis_at.to_le_bytes());
        out.extend(commit_at.to_le_bytes());
        out.resize(AIE_PARTITION_SIZE, 0);
        out.extend(tail);
        out
    }

    /// A whole file of `sections` (kind, name, bytes), each 8-byte aligned after the table.
    pub fn xclbin(uuid: [u8; 16], sections: &[(u32, &str, Vec<u8>)]) -> Vec<u8> {
        let table_end = SECTIONS_OFFSET + sections.len() * SECTION_HEADER_SIZE;
        let mut data = vec![0u8; table_end.next_multiple_of(8)];
        data[..8].copy_from_slice(MAGIC);
        data[8..12].copy_from_slice(&(-1i32).to_le_bytes());
        data[12..40].fill(0xff);
        let h = HEADER_OFFSET;
        data[h + 24..h + 26].copy_from_slice(&0u16.to_le_bytes());
        data[h + 26] = 2;
        data[h + 27] = 1;
        data[h + 112..h + 128].copy_from_slice(&uuid);
        data[NUM_SECTIONS_OFFSET..NUM_SECTIONS_OFFSET + 4]
            .copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, (kind, name, bytes)) in sections.iter().enumerate() {
            let offset = data.len();
            data.extend(bytes);
            data.resize(data.len().next_multiple_of(8), 0);
            let at = SECTIONS_OFFSET + i * SECTION_HEADER_SIZE;
            let mut hdr = Vec::new();
            hdr.extend(kind.to_le_bytes());
            put_name(&mut hdr, name, 16);
            hdr.extend([0u8; 4]);
            hdr.extend((offset as u64).to_le_bytes());
            hdr.extend((bytes.len() as u64).to_le_bytes());
            data[at..at + SECTION_HEADER_SIZE].copy_from_slice(&hdr);
        }
        let len = data.len() as u64;
        data[h..h + 8].copy_from_slice(&len.to_le_bytes());
        data
    }

    /// A small well-formed NPU xclbin: one partition of `cols` columns with one PDI per CU
    /// name, each CU a DPU kernel whose id its PDI's CDO group lists.
    pub fn npu_xclbin(cu_names: &[&str], cols: u16, ops_per_cycle: u32) -> Vec<u8> {
        let ips: Vec<IpData> =
            cu_names.iter().enumerate().map(|(i, n)| dpu_cu(n, i as u32 + 1, 0)).collect();
        let pdis = (0..cu_names.len())
            .map(|i| Pdi {
                uuid: [i as u8 + 1; 16],
                image: (0..64 + 8 * i).map(|b| b as u8).collect(),
                cdo_groups: vec![CdoGroup {
                    name: format!("group{i}"),
                    cdo_type: 1,
                    pdi_id: i as u64,
                    kernel_ids: vec![i as u64 + 1],
                    pre_cdo_groups: vec![],
                }],
            })
            .collect();
        let part = AiePartition {
            schema_version: 0,
            name: "unicorn-test".into(),
            ops_per_cycle,
            inference_fingerprint: 0x1234,
            pre_post_fingerprint: 0,
            column_width: cols,
            start_columns: vec![0],
            pdis,
            kernel_commit_id: String::new(),
        };
        xclbin(
            [0xab; 16],
            &[
                (kind::IP_LAYOUT, "ip_layout", ip_layout(&ips)),
                (kind::AIE_PARTITION, "aie_partition", aie_partition(&part)),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_file_parses_back() {
        let data = build::npu_xclbin(&["mv", "rmsnorm"], 4, 2048);
        let x = Xclbin::parse(&data).unwrap();
        assert_eq!(x.length, data.len() as u64);
        assert_eq!(x.version, (2, 1, 0));
        assert_eq!(x.uuid, [0xab; 16]);
        assert_eq!(x.sections.len(), 2);
        assert_eq!(x.ip_layout.len(), 2);
        assert!(x.ip_layout.iter().all(IpData::is_dpu_cu));
        let p = x.partition.as_ref().unwrap();
        assert_eq!((p.name.as_str(), p.ops_per_cycle, p.column_width), ("unicorn-test", 2048, 4));
        assert_eq!(p.pdis.len(), 2);
        assert_eq!(p.pdis[1].image.len(), 72);
        assert_eq!(p.pdis[1].cdo_groups[0].kernel_ids, vec![2]);
        let cus = x.compute_units().unwrap();
        assert_eq!(cus[1], ComputeUnit { name: "rmsnorm".into(), kernel_id: 2, func: 0, pdi: 1 });
    }

    #[test]
    fn the_ps_kernel_bitfields_follow_xclbin_h() {
        let ip = build::dpu_cu("k", 0xabc, 1);
        assert_eq!(ip.properties, 0x0abc_0011);
        assert_eq!((ip.subtype(), ip.functional(), ip.kernel_id()), (1, 1, 0xabc));
    }
}
