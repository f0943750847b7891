//! Exec-buffer command packets (`struct amdxdna_cmd`, XRT's `ert_packet`): ERT_START_NPU runs one
//! kernel, ERT_CMD_CHAIN runs several command BOs in one submission.
//!
//! Header word: state [3:0], extra CU masks [11:10], count [22:12] (32-bit words after the
//! header), opcode [27:23]. ERT_START_NPU: CU mask(s), then `struct amdxdna_cmd_start_npu`
//! {u64 instruction buffer device address, u32 size in bytes, u32 property count}, the
//! properties, then the kernel's arguments. ERT_CMD_CHAIN (no CU mask): `struct
//! amdxdna_cmd_chain` {u32 command_count, submit_index, error_index, reserved[3]; u64 BO
//! handles[command_count]}. All little-endian.

use std::fmt;

pub const ERT_START_CU: u8 = 0;
pub const ERT_CMD_CHAIN: u8 = 19;
pub const ERT_START_NPU: u8 = 20;

const STATE_MASK: u32 = 0xf;
const EXTRA_CU_SHIFT: u32 = 10;
const COUNT_SHIFT: u32 = 12;
const COUNT_MASK: u32 = 0x7ff;
const OPCODE_SHIFT: u32 = 23;
const OPCODE_MASK: u32 = 0x1f;
/// The most 32-bit words a packet can carry after its header (11-bit count).
pub const MAX_PAYLOAD_WORDS: usize = COUNT_MASK as usize;
/// Words of `struct amdxdna_cmd_chain` before the handles.
const CHAIN_HEAD_WORDS: usize = 6;
/// Words of `struct amdxdna_cmd_start_npu` before the properties.
const NPU_HEAD_WORDS: usize = 4;

/// `enum ert_cmd_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdState {
    Invalid,
    New,
    Queued,
    Running,
    Completed,
    Error,
    Abort,
    Submitted,
    Timeout,
    NoResponse,
    Unknown(u8),
}

impl CmdState {
    pub fn from_bits(v: u8) -> CmdState {
        use CmdState::*;
        match v {
            0 => Invalid,
            1 => New,
            2 => Queued,
            3 => Running,
            4 => Completed,
            5 => Error,
            6 => Abort,
            7 => Submitted,
            8 => Timeout,
            9 => NoResponse,
            x => Unknown(x),
        }
    }

    pub fn bits(self) -> u8 {
        use CmdState::*;
        match self {
            Invalid => 0,
            New => 1,
            Queued => 2,
            Running => 3,
            Completed => 4,
            Error => 5,
            Abort => 6,
            Submitted => 7,
            Timeout => 8,
            NoResponse => 9,
            Unknown(x) => x,
        }
    }

    /// Whether the device is done with the command (any final state).
    pub fn is_final(self) -> bool {
        !matches!(self, CmdState::New | CmdState::Queued | CmdState::Running | CmdState::Submitted)
    }
}

impl fmt::Display for CmdState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdState::Unknown(x) => write!(f, "unknown ({x})"),
            other => write!(f, "{}", format!("{other:?}").to_uppercase()),
        }
    }
}

/// The header word.
pub fn header(state: CmdState, extra_cu_masks: u32, count: usize, opcode: u8) -> u32 {
    u32::from(state.bits()) & STATE_MASK
        | (extra_cu_masks & 3) << EXTRA_CU_SHIFT
        | (count as u32 & COUNT_MASK) << COUNT_SHIFT
        | (u32::from(opcode) & OPCODE_MASK) << OPCODE_SHIFT
}

/// The fields of a header word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub state: CmdState,
    pub extra_cu_masks: u32,
    pub count: usize,
    pub opcode: u8,
}

impl Header {
    pub fn parse(word: u32) -> Header {
        Header {
            state: CmdState::from_bits((word & STATE_MASK) as u8),
            extra_cu_masks: (word >> EXTRA_CU_SHIFT) & 3,
            count: ((word >> COUNT_SHIFT) & COUNT_MASK) as usize,
            opcode: ((word >> OPCODE_SHIFT) & OPCODE_MASK) as u8,
        }
    }
}

/// One kernel run: ERT_START_NPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartNpu {
    /// The CU (index into the context's CONFIG_CU list) as a one-bit mask.
    pub cu_mask: u32,
    /// Device address of the instruction stream (a DEV BO's `xdna_addr`).
    pub instr_addr: u64,
    /// Instruction stream size in bytes.
    pub instr_size: u32,
    /// Kernel arguments, 32-bit words (device addresses are two words, low first).
    pub args: Vec<u32>,
}

/// Why a packet cannot be encoded or does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("payload of {0} words exceeds the 11-bit count")]
    TooLong(usize),
    #[error("header count {count} needs {need} bytes, the buffer has {have}")]
    CountPastEnd { count: usize, need: usize, have: usize },
    #[error("opcode {0} is not ERT_START_NPU or ERT_CMD_CHAIN")]
    Opcode(u8),
    #[error("CU mask is zero")]
    NoCu,
    #[error("payload of {0} words is too short for its opcode")]
    ShortPayload(usize),
    #[error("chain of {count} commands does not fit a payload of {words} words")]
    ChainCount { count: u32, words: usize },
    #[error("chain is empty")]
    EmptyChain,
    #[error("chain handle {0:#x} does not fit 32 bits")]
    ChainHandle(u64),
    #[error("reserved field is not zero")]
    Reserved,
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn bytes_to_words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Splits a 64-bit value into two words, low first.
pub fn u64_words(v: u64) -> [u32; 2] {
    [v as u32, (v >> 32) as u32]
}

impl StartNpu {
    /// The packet's bytes, state NEW.
    pub fn encode(&self) -> Result<Vec<u8>, PacketError> {
        if self.cu_mask == 0 {
            return Err(PacketError::NoCu);
        }
        let mut payload = vec![self.cu_mask];
        payload.extend(u64_words(self.instr_addr));
        payload.push(self.instr_size);
        payload.push(0); // property count
        payload.extend(&self.args);
        if payload.len() > MAX_PAYLOAD_WORDS {
            return Err(PacketError::TooLong(payload.len()));
        }
        let mut words = vec![header(CmdState::New, 0, payload.len(), ERT_START_NPU)];
        words.extend(payload);
        Ok(words_to_bytes(&words))
    }
}

/// The opcode word XRT puts first in an ERT_START_NPU run's arguments: "run the transaction
/// binary (instruction stream) named in the packet" (`host_app` in XRT's shim tests).
pub const NPU_TXN_OPCODE: u64 = 3;
/// Buffer slots of an mlir-aie (IRON) kernel: its runtime sequence's arguments, in order.
pub const NPU_BO_SLOTS: usize = 5;

/// The argument words of an mlir-aie kernel run, as XRT's shim lays them out for the `MLIR_AIE`
/// compute unit: u64 opcode 3, u64 and u32 placeholders where XRT's kernel signature has the
/// instruction BO and its length (the packet's `amdxdna_cmd_start_npu` carries those), then
/// the device address of each buffer of the design's runtime sequence, in the sequence's order,
/// unused slots zero. `None` when more than [`NPU_BO_SLOTS`] buffers are given.
pub fn npu_args(bo_addrs: &[u64]) -> Option<Vec<u32>> {
    if bo_addrs.len() > NPU_BO_SLOTS {
        return None;
    }
    let mut args = Vec::with_capacity(5 + 2 * NPU_BO_SLOTS);
    args.extend(u64_words(NPU_TXN_OPCODE));
    args.extend(u64_words(0));
    args.push(0);
    for i in 0..NPU_BO_SLOTS {
        args.extend(u64_words(bo_addrs.get(i).copied().unwrap_or(0)));
    }
    Some(args)
}

/// The buffer addresses of arguments laid out by [`npu_args`] (`None` when they are not).
pub fn npu_arg_addrs(args: &[u32]) -> Option<Vec<u64>> {
    if args.len() != 5 + 2 * NPU_BO_SLOTS
        || u64::from(args[0]) | u64::from(args[1]) << 32 != NPU_TXN_OPCODE
    {
        return None;
    }
    Some(args[5..].chunks_exact(2).map(|p| u64::from(p[0]) | u64::from(p[1]) << 32).collect())
}

/// An ERT_CMD_CHAIN packet's bytes, state NEW, naming the command BOs `handles` in order.
pub fn encode_chain(handles: &[u32]) -> Result<Vec<u8>, PacketError> {
    if handles.is_empty() {
        return Err(PacketError::EmptyChain);
    }
    let mut payload = vec![handles.len() as u32, 0, 0, 0, 0, 0];
    for &h in handles {
        payload.extend(u64_words(u64::from(h)));
    }
    if payload.len() > MAX_PAYLOAD_WORDS {
        return Err(PacketError::TooLong(payload.len()));
    }
    let mut words = vec![header(CmdState::New, 0, payload.len(), ERT_CMD_CHAIN)];
    words.extend(payload);
    Ok(words_to_bytes(&words))
}

/// A packet as a device reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    StartNpu { header: Header, cu_masks: Vec<u32>, run: StartNpu, prop_count: u32 },
    Chain { header: Header, submit_index: u32, error_index: u32, handles: Vec<u32> },
}

impl Packet {
    /// Decodes and checks a packet the way the driver does before submitting it: the count
    /// must fit the buffer, the opcode must be one the NPU runs, a START_NPU needs a non-zero CU
    /// mask and its fixed fields, a chain's handle count must fit its payload and its reserved
    /// words be zero.
    pub fn decode(bytes: &[u8]) -> Result<Packet, PacketError> {
        if bytes.len() < 4 {
            return Err(PacketError::Short(bytes.len()));
        }
        let h = Header::parse(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
        let need = 4 + 4 * h.count;
        if need > bytes.len() {
            return Err(PacketError::CountPastEnd { count: h.count, need, have: bytes.len() });
        }
        let w = bytes_to_words(&bytes[4..need]);
        match h.opcode {
            ERT_START_NPU => {
                let masks = 1 + h.extra_cu_masks as usize;
                if w.len() < masks + NPU_HEAD_WORDS {
                    return Err(PacketError::ShortPayload(w.len()));
                }
                let cu_masks = w[..masks].to_vec();
                if cu_masks.iter().all(|&m| m == 0) {
                    return Err(PacketError::NoCu);
                }
                let p = &w[masks..];
                let prop_count = p[3];
                let rest = &p[NPU_HEAD_WORDS..];
                if prop_count as usize > rest.len() {
                    return Err(PacketError::ShortPayload(w.len()));
                }
                let run = StartNpu {
                    cu_mask: cu_masks[0],
                    instr_addr: u64::from(p[0]) | u64::from(p[1]) << 32,
                    instr_size: p[2],
                    args: rest[prop_count as usize..].to_vec(),
                };
                Ok(Packet::StartNpu { header: h, cu_masks, run, prop_count })
            }
            ERT_CMD_CHAIN => {
                if w.len() < CHAIN_HEAD_WORDS {
                    return Err(PacketError::ShortPayload(w.len()));
                }
                let count = w[0];
                if count == 0 {
                    return Err(PacketError::EmptyChain);
                }
                if w[3..6].iter().any(|&r| r != 0) {
                    return Err(PacketError::Reserved);
                }
                let have = (w.len() - CHAIN_HEAD_WORDS) / 2;
                if count as usize > have {
                    return Err(PacketError::ChainCount { count, words: w.len() });
                }
                let mut handles = Vec::with_capacity(count as usize);
                for pair in w[CHAIN_HEAD_WORDS..].chunks_exact(2).take(count as usize) {
                    let v = u64::from(pair[0]) | u64::from(pair[1]) << 32;
                    handles.push(u32::try_from(v).map_err(|_| PacketError::ChainHandle(v))?);
                }
                Ok(Packet::Chain { header: h, submit_index: w[1], error_index: w[2], handles })
            }
            op => Err(PacketError::Opcode(op)),
        }
    }
}

/// The state in a packet's header word (`bytes` holds at least the header).
pub fn state_of(bytes: &[u8]) -> Option<CmdState> {
    let b = bytes.get(..4)?;
    Some(Header::parse(u32::from_le_bytes([b[0], b[1], b[2], b[3]])).state)
}

/// `bytes`' header with its state replaced.
pub fn with_state(word: u32, state: CmdState) -> u32 {
    (word & !STATE_MASK) | u32::from(state.bits()) & STATE_MASK
}

/// Byte offset of a chain's `error_index` in its packet.
pub const CHAIN_ERROR_INDEX_OFFSET: usize = 4 + 2 * 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bits_are_where_the_uapi_puts_them() {
        // state 1 (NEW), count 5, opcode 20: 1 | 5 << 12 | 20 << 23.
        assert_eq!(header(CmdState::New, 0, 5, ERT_START_NPU), 0x0A00_5001);
        assert_eq!(header(CmdState::Completed, 3, 0x7ff, 0x1f), 0x0FFF_FC04);
        let h = Header::parse(0x0A00_5001);
        assert_eq!(h, Header { state: CmdState::New, extra_cu_masks: 0, count: 5, opcode: 20 });
    }

    #[test]
    fn start_npu_round_trips() {
        let run = StartNpu {
            cu_mask: 1 << 2,
            instr_addr: 0x1_0400_0000,
            instr_size: 4096,
            args: vec![3, 0, 0xdead_beef, 7],
        };
        let b = run.encode().unwrap();
        // header + mask + {addr lo, addr hi, size, props} + 4 args
        assert_eq!(b.len(), 4 * (1 + 1 + 4 + 4));
        assert_eq!(&b[8..12], &0x0400_0000u32.to_le_bytes());
        assert_eq!(&b[12..16], &1u32.to_le_bytes());
        match Packet::decode(&b).unwrap() {
            Packet::StartNpu { header, run: r, prop_count, .. } => {
                assert_eq!(header.opcode, ERT_START_NPU);
                assert_eq!(header.count, 9);
                assert_eq!(header.state, CmdState::New);
                assert_eq!(prop_count, 0);
                assert_eq!(r, run);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chain_round_trips_and_rejects_bad_layouts() {
        let b = encode_chain(&[5, 6, 9]).unwrap();
        assert_eq!(b.len(), 4 * (1 + 6 + 6));
        match Packet::decode(&b).unwrap() {
            Packet::Chain { handles, error_index, .. } => {
                assert_eq!(handles, vec![5, 6, 9]);
                assert_eq!(error_index, 0);
            }
            other => panic!("{other:?}"),
        }
        // A count larger than the handles present.
        let mut bad = b.clone();
        bad[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(Packet::decode(&bad), Err(PacketError::ChainCount { count: 4, .. })));
        // Reserved words must be zero.
        let mut bad = b.clone();
        bad[16..20].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Packet::decode(&bad), Err(PacketError::Reserved));
        // A handle above 32 bits.
        let mut bad = b;
        bad[32..36].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(Packet::decode(&bad), Err(PacketError::ChainHandle(_))));
        assert_eq!(encode_chain(&[]), Err(PacketError::EmptyChain));
    }

    #[test]
    fn decode_rejects_truncation_and_bad_opcodes() {
        let run = StartNpu { cu_mask: 1, instr_addr: 0, instr_size: 4, args: vec![] };
        let b = run.encode().unwrap();
        for cut in 0..b.len() {
            assert!(Packet::decode(&b[..cut]).is_err(), "prefix {cut}");
        }
        let mut bad = b.clone();
        bad[..4].copy_from_slice(&header(CmdState::New, 0, 5, ERT_START_CU).to_le_bytes());
        assert_eq!(Packet::decode(&bad), Err(PacketError::Opcode(0)));
        let mut bad = b;
        bad[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Packet::decode(&bad), Err(PacketError::NoCu));
        let too_long = StartNpu { args: vec![0; MAX_PAYLOAD_WORDS], ..run };
        assert!(matches!(too_long.encode(), Err(PacketError::TooLong(_))));
    }

    #[test]
    fn npu_args_follow_the_xrt_layout() {
        let a = npu_args(&[0x1_0000_2000, 0x40]).unwrap();
        assert_eq!(a.len(), 15);
        assert_eq!(&a[..5], &[3, 0, 0, 0, 0]);
        assert_eq!(&a[5..9], &[0x2000, 1, 0x40, 0]);
        assert!(a[9..].iter().all(|&w| w == 0));
        assert_eq!(npu_arg_addrs(&a).unwrap(), vec![0x1_0000_2000, 0x40, 0, 0, 0]);
        assert!(npu_args(&[0; 6]).is_none());
        assert!(npu_arg_addrs(&a[1..]).is_none());
    }

    #[test]
    fn states_print_and_round_trip() {
        for v in 0..16u8 {
            assert_eq!(CmdState::from_bits(v).bits(), v);
        }
        assert_eq!(CmdState::Completed.to_string(), "COMPLETED");
        assert_eq!(CmdState::NoResponse.to_string(), "NORESPONSE");
        assert!(CmdState::Timeout.is_final() && !CmdState::Running.is_final());
    }
}
