//! The whole host path against the test double (FakeDevice): open, heap, xclbin configure,
//! submit, wait, teardown, and the error paths. The fake computes nothing; these tests check
//! the calls, never numbers.

use std::sync::Arc;

use unicorn_xdna::bo::{Bo, BoKind, SyncDir};
use unicorn_xdna::cmd::{CmdState, StartNpu};
use unicorn_xdna::device::Device;
use unicorn_xdna::fake::{FakeDevice, Outcome};
use unicorn_xdna::hwctx::{Client, QosPriority, DEFAULT_HEAP_BYTES};
use unicorn_xdna::sys::{self, CreateBo, CreateHwctx, ExecCmd, GemClose, QosInfo};
use unicorn_xdna::xclbin::{build, Xclbin};
use unicorn_xdna::XdnaError;

fn setup() -> (Arc<FakeDevice>, Client) {
    let fake = Arc::new(FakeDevice::new());
    let dev: Arc<dyn Device> = fake.clone();
    let client = Client::new(dev, DEFAULT_HEAP_BYTES).unwrap();
    (fake, client)
}

fn xclbin() -> Xclbin {
    Xclbin::parse(&build::npu_xclbin(&["matvec", "rms_norm"], 4, 2048)).unwrap()
}

fn errno(e: &XdnaError) -> Option<i32> {
    match e {
        XdnaError::Ioctl { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// A START_NPU command for CU `cu` whose instructions are in `instr`, with two data BOs.
fn run_for(client: &Client, ctx_mask: u32, instr: &Bo, data: &[&Bo]) -> Bo {
    let mut args = vec![3, 0];
    for d in data {
        args.extend(unicorn_xdna::cmd::u64_words(d.xdna_addr()));
    }
    client
        .command(&StartNpu {
            cu_mask: ctx_mask,
            instr_addr: instr.xdna_addr(),
            instr_size: instr.size() as u32,
            args,
        })
        .unwrap()
}

#[test]
fn the_whole_host_path_runs_and_tears_down() {
    let (fake, client) = setup();
    assert!(client.device().is_test_double());
    let ctx = client.load(&xclbin(), 16, QosPriority::High).unwrap();
    assert_eq!(fake.context_priority(ctx.handle()), Some(sys::QOS_HIGH_PRIORITY));
    let mask = ctx.cu_mask("rms_norm").unwrap();
    assert_eq!(mask, 2);
    let instr = client.dev_bo_with(&[0u8; 256]).unwrap();
    let x = client.shmem(4096).unwrap();
    let y = client.shmem(4096).unwrap();
    x.write(0, &[7u8; 64]).unwrap();
    x.sync_all(SyncDir::ToDevice).unwrap();
    y.write(0, &[0x5a; 16]).unwrap();
    let cmd = run_for(&client, mask, &instr, &[&x, &y]);
    ctx.run(&cmd, &[&instr, &x, &y]).unwrap();
    y.sync_all(SyncDir::FromDevice).unwrap();
    // Nothing was computed: the output is what the host left there.
    let mut out = [0u8; 16];
    y.read(0, &mut out).unwrap();
    assert_eq!(out, [0x5a; 16]);
    let calls = fake.calls();
    let pos = |p: &str| {
        calls.iter().position(|c| c.starts_with(p)).unwrap_or_else(|| panic!("{p} in {calls:?}"))
    };
    assert!(pos("CREATE_BO(type 2") < pos("mmap(1)"));
    assert!(pos("mmap(1)") < pos("CREATE_BO(type 3"));
    assert!(pos("CREATE_BO(type 3") < pos("CREATE_HWCTX"));
    assert!(pos("CREATE_HWCTX") < pos("CONFIG_HWCTX"));
    assert!(pos("CONFIG_HWCTX") < pos("EXEC_CMD"));
    assert!(pos("EXEC_CMD") < pos("SYNCOBJ_TIMELINE_WAIT"));
    drop((cmd, x, y, instr, ctx, client));
    assert_eq!(fake.live(), (0, 0), "{:?}", fake.calls());
    let calls = fake.calls();
    let destroy = calls.iter().position(|c| c.starts_with("DESTROY_HWCTX")).unwrap();
    let last_close = calls.iter().rposition(|c| c.starts_with("GEM_CLOSE")).unwrap();
    assert!(destroy < last_close, "the context goes before its CU BOs and the heap");
}

#[test]
fn a_chain_runs_several_kernels_in_one_submission() {
    let (fake, client) = setup();
    let ctx = client.load(&xclbin(), 16, QosPriority::Normal).unwrap();
    let instr = client.dev_bo_with(&[0u8; 64]).unwrap();
    let a = run_for(&client, 1, &instr, &[]);
    let b = run_for(&client, 2, &instr, &[]);
    let chain = client.chain(&[&a, &b]).unwrap();
    ctx.run(&chain, &[&a, &b, &instr]).unwrap();
    // Second chain: the device fails its second member.
    fake.push_outcome(Outcome::Fail { state: CmdState::Error, chain_index: 1 });
    let e = ctx.run(&chain, &[&a, &b, &instr]).unwrap_err();
    assert!(matches!(e, XdnaError::Command { state: CmdState::Error, index: Some(1) }), "{e}");
    assert!(e.job_failure());
    // A chain may only hold CMD BOs.
    assert!(client.chain(&[&a, &instr]).is_err());
}

#[test]
fn error_and_timeout_states_become_job_errors() {
    let (fake, client) = setup();
    let mut ctx = client.load(&xclbin(), 16, QosPriority::Low).unwrap();
    ctx.set_timeout(std::time::Duration::from_millis(10));
    let instr = client.dev_bo_with(&[0u8; 64]).unwrap();
    let cmd = run_for(&client, 1, &instr, &[]);
    for state in [CmdState::Error, CmdState::Timeout, CmdState::Abort, CmdState::NoResponse] {
        fake.push_outcome(Outcome::Fail { state, chain_index: 0 });
        let e = ctx.run(&cmd, &[&instr]).unwrap_err();
        assert!(matches!(e, XdnaError::Command { state: s, index: None } if s == state), "{e}");
    }
    fake.push_outcome(Outcome::Hang);
    let e = ctx.run(&cmd, &[&instr]).unwrap_err();
    assert!(matches!(e, XdnaError::Timeout(_)), "{e}");
    assert!(e.job_failure());
    // The context still works afterwards.
    ctx.run(&cmd, &[&instr]).unwrap();
}

#[test]
fn instructions_outside_the_heap_fault_the_command() {
    let (_fake, client) = setup();
    let ctx = client.load(&xclbin(), 16, QosPriority::Normal).unwrap();
    let shm = client.shmem(4096).unwrap();
    // An instruction "stream" in a SHMEM BO: not a DEV BO, so the firmware cannot fetch it.
    let cmd = run_for(&client, 1, &shm, &[]);
    let e = ctx.run(&cmd, &[&shm]).unwrap_err();
    assert!(matches!(e, XdnaError::Command { state: CmdState::Error, .. }), "{e}");
}

#[test]
fn a_refused_context_is_an_ioctl_error_and_leaks_nothing() {
    let (fake, client) = setup();
    fake.refuse_contexts(Some(libc::ENOSPC));
    let e = client.load(&xclbin(), 16, QosPriority::Normal).unwrap_err();
    assert_eq!(errno(&e), Some(libc::ENOSPC), "{e}");
    assert!(!e.job_failure());
    // Only the heap is left: the CU BOs made for the refused context were closed.
    assert_eq!(fake.live(), (1, 0));
    fake.refuse_contexts(None);
    client.load(&xclbin(), 16, QosPriority::Normal).unwrap();
}

#[test]
fn the_fake_validates_like_the_driver() {
    let fake = FakeDevice::new();
    let qos = QosInfo::default();
    // No heap yet: a context is refused (ENOENT), and so is a DEV BO.
    let mut c = CreateHwctx { max_opc: 1, num_tiles: 4, ..Default::default() };
    assert_eq!(fake.create_hwctx(&mut c, &qos).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    let mut b = CreateBo { size: 4096, ty: sys::BO_DEV, ..Default::default() };
    assert_eq!(fake.create_bo(&mut b).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // MBZ fields, unknown types, empty sizes.
    for bad in [
        CreateBo { size: 4096, ty: sys::BO_SHMEM, flags: 1, ..Default::default() },
        CreateBo { size: 4096, ty: sys::BO_SHMEM, vaddr: 8, ..Default::default() },
        CreateBo { size: 4096, ty: 9, ..Default::default() },
        CreateBo { size: 0, ty: sys::BO_SHMEM, ..Default::default() },
        CreateBo { size: 2, ty: sys::BO_CMD, ..Default::default() },
        CreateBo { size: 128 << 20, ty: sys::BO_DEV_HEAP, ..Default::default() },
    ] {
        let mut b = bad;
        assert_eq!(
            fake.create_bo(&mut b).unwrap_err().raw_os_error(),
            Some(libc::EINVAL),
            "{bad:?}"
        );
    }
    // One heap per client.
    let mut h = CreateBo { size: 1 << 20, ty: sys::BO_DEV_HEAP, ..Default::default() };
    fake.create_bo(&mut h).unwrap();
    let mut h2 = h;
    assert_eq!(fake.create_bo(&mut h2).unwrap_err().raw_os_error(), Some(libc::EBUSY));
    // Handle ownership: a second close fails.
    let mut s = CreateBo { size: 100, ty: sys::BO_SHMEM, ..Default::default() };
    fake.create_bo(&mut s).unwrap();
    fake.gem_close(&mut GemClose { handle: s.handle, pad: 0 }).unwrap();
    assert!(fake.gem_close(&mut GemClose { handle: s.handle, pad: 0 }).is_err());
    // Tile counts: not a multiple of the core rows, or more than the array has.
    for tiles in [0, 3, 24] {
        let mut c = CreateHwctx { max_opc: 1, num_tiles: tiles, ..Default::default() };
        assert_eq!(fake.create_hwctx(&mut c, &qos).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }
    let mut c = CreateHwctx { max_opc: 1, num_tiles: 4, ext: 1, ..Default::default() };
    assert_eq!(fake.create_hwctx(&mut c, &qos).unwrap_err().raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn config_and_exec_are_checked() {
    let (fake, client) = setup();
    let ctx = client.load(&xclbin(), 16, QosPriority::Normal).unwrap();
    // A second CONFIG_CU on a configured context is refused.
    let pdi = client.dev_bo_with(&[1u8; 64]).unwrap();
    let mut payload = vec![1, 0, 0, 0, 0, 0, 0, 0];
    payload.extend(pdi.handle().to_le_bytes());
    payload.extend([0u8; 4]);
    let mut a = sys::ConfigHwctx { handle: ctx.handle(), ..Default::default() };
    assert_eq!(fake.config_hwctx(&mut a, &payload).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // A CU that is not a DEV BO.
    let other = client.load(&xclbin(), 4, QosPriority::Normal);
    drop(other);
    let shm = client.shmem(64).unwrap();
    let mut c = CreateHwctx { max_opc: 1, num_tiles: 4, ..Default::default() };
    fake.create_hwctx(&mut c, &QosInfo::default()).unwrap();
    let mut p2 = vec![1, 0, 0, 0, 0, 0, 0, 0];
    p2.extend(shm.handle().to_le_bytes());
    p2.extend([0u8; 4]);
    let mut a = sys::ConfigHwctx { handle: c.handle, ..Default::default() };
    assert_eq!(fake.config_hwctx(&mut a, &p2).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    // Wrong payload size for the CU count.
    p2.push(0);
    assert_eq!(fake.config_hwctx(&mut a, &p2).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // EXEC on an unconfigured context.
    let instr = client.dev_bo_with(&[0u8; 64]).unwrap();
    let cmd = run_for(&client, 1, &instr, &[]);
    let mut e = ExecCmd {
        hwctx: c.handle,
        cmd_handles: u64::from(cmd.handle()),
        cmd_count: 1,
        ..Default::default()
    };
    assert_eq!(fake.exec_cmd(&mut e, &[]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // EXEC of a non-CMD BO, of a CU the context lacks, and with a dead argument BO.
    let mut e = ExecCmd {
        hwctx: ctx.handle(),
        cmd_handles: u64::from(shm.handle()),
        cmd_count: 1,
        ..Default::default()
    };
    assert_eq!(fake.exec_cmd(&mut e, &[]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    let bad_cu = run_for(&client, 1 << 5, &instr, &[]);
    assert_eq!(errno(&ctx.run(&bad_cu, &[]).unwrap_err()), Some(libc::EINVAL));
    let mut e = ExecCmd {
        hwctx: ctx.handle(),
        cmd_handles: u64::from(cmd.handle()),
        cmd_count: 1,
        arg_count: 1,
        ..Default::default()
    };
    assert_eq!(fake.exec_cmd(&mut e, &[9999]).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    // arg_count must match the handles given; the type must be EXEC_BUF.
    let mut e = ExecCmd {
        hwctx: ctx.handle(),
        cmd_handles: u64::from(cmd.handle()),
        cmd_count: 1,
        arg_count: 2,
        ..Default::default()
    };
    assert_eq!(
        fake.exec_cmd(&mut e, &[instr.handle()]).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    let mut e = ExecCmd {
        hwctx: ctx.handle(),
        ty: sys::CMD_SUBMIT_SIGNAL,
        cmd_handles: u64::from(cmd.handle()),
        cmd_count: 1,
        ..Default::default()
    };
    assert_eq!(fake.exec_cmd(&mut e, &[]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    // A corrupted header (count past the BO) is refused.
    let junk = Bo::new(client.device(), BoKind::Cmd, 4096).unwrap();
    junk.write(0, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(errno(&ctx.run(&junk, &[]).unwrap_err()), Some(libc::EINVAL));
    // BO bounds on the host side.
    assert!(instr.write(60, &[0; 8]).is_err());
    assert!(instr.sync(SyncDir::ToDevice, 0, 65).is_err());
}

#[test]
fn the_heap_runs_out_and_dev_bos_come_back() {
    let fake = Arc::new(FakeDevice::new());
    let dev: Arc<dyn Device> = fake.clone();
    let client = Client::new(dev, 64 << 10).unwrap();
    let a = client.dev_bo(32 << 10).unwrap();
    let b = client.dev_bo(32 << 10).unwrap();
    assert_ne!(a.xdna_addr(), b.xdna_addr());
    assert_eq!(errno(&client.dev_bo(4096).unwrap_err()), Some(libc::ENOMEM));
    drop(a);
    let c = client.dev_bo(4096).unwrap();
    assert_eq!(c.xdna_addr(), unicorn_xdna::fake::HEAP_XDNA_BASE);
    // DEV BOs share the heap's mapping: bytes written through one are in the heap.
    c.write(0, b"npu!").unwrap();
    let mut out = [0u8; 4];
    c.read(0, &mut out).unwrap();
    assert_eq!(&out, b"npu!");
}

/// The runtime the engine drives: a prepared run names the instruction stream and the buffers
/// in the XRT argument layout; failures are counted and retire the kernel after RETIRE_AFTER,
/// which gives its contexts back and refuses further runs.
#[test]
fn the_runtime_runs_counts_and_retires() {
    use unicorn_xdna::cmd::{npu_arg_addrs, Packet};
    use unicorn_xdna::manifest::{DType, Kernel, Manifest, Op, Ready, Shape, WeightLayout};
    use unicorn_xdna::runtime::{Runtime, RETIRE_AFTER};

    let fake = Arc::new(FakeDevice::new());
    let ready = Ready {
        kernel: Kernel {
            name: "mv".into(),
            op: Op::Matvec,
            xclbin: "build/mv.xclbin".into(),
            instructions: "build/mv.insts.bin".into(),
            cu: "MLIR_AIE".into(),
            shape: Shape { m: 64, k: 64, n: 1 },
            dtype: DType::Bf16,
            weights: WeightLayout::RowMajorBf16,
            columns: 2,
            source: None,
            eps: None,
        },
        xclbin: Xclbin::parse(&build::npu_xclbin(&["MLIR_AIE"], 2, 256)).unwrap(),
        instructions: vec![0; 128],
    };
    let m = Manifest { dir: "t".into(), ready: vec![ready], unusable: Vec::new() };
    let rt = Runtime::new(fake.clone(), &m, 4).unwrap();
    let (w, x, y) = (rt.shmem(8192).unwrap(), rt.shmem(128).unwrap(), rt.shmem(128).unwrap());
    let p = rt.prepare(0, QosPriority::Low, &[&w, &x, &y]).unwrap();
    assert!(fake.calls().contains(&"CREATE_HWCTX(tiles 8, opc 256)".to_owned()));
    rt.run(&p, QosPriority::Low, &[&w, &x, &y]).unwrap();
    let sub = fake.submissions().pop().unwrap();
    let Packet::StartNpu { run, .. } = sub.packet else { panic!("{sub:?}") };
    assert_eq!(run.instr_size, 128);
    assert_eq!(
        npu_arg_addrs(&run.args).unwrap(),
        vec![w.xdna_addr(), x.xdna_addr(), y.xdna_addr(), 0, 0]
    );
    assert_eq!(&sub.args[1..], &[w.handle(), x.handle(), y.handle()]);
    assert_eq!(fake.context_priorities()[0].1, sys::QOS_LOW_PRIORITY);
    // The packet is written again before each run: the device left COMPLETED in it.
    rt.run(&p, QosPriority::Low, &[&w, &x, &y]).unwrap();
    assert_eq!(rt.stats().runs, 2);
    fake.set_default_outcome(Some(Outcome::Fail { state: CmdState::Error, chain_index: 0 }));
    for i in 1..=RETIRE_AFTER {
        let e = rt.run(&p, QosPriority::Low, &[&w, &x, &y]).unwrap_err();
        assert!(e.job_failure(), "{e}");
        assert_eq!(rt.failed(0, &e), i == RETIRE_AFTER);
    }
    assert!(!rt.usable(0));
    assert_eq!(rt.retired(), ["mv"]);
    assert_eq!(rt.stats().fallbacks, u64::from(RETIRE_AFTER));
    assert!(fake.context_priorities().is_empty(), "a retired kernel's context is destroyed");
    let submitted = fake.submissions().len();
    assert!(rt.run(&p, QosPriority::Low, &[&w, &x, &y]).is_err());
    assert_eq!(fake.submissions().len(), submitted, "nothing submitted for a retired kernel");
    drop((p, w, x, y, rt));
    assert_eq!(fake.live(), (0, 0));
}
