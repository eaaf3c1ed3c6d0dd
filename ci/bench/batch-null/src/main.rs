//! `batch-null MODE STOPFILE`: adds a 1 GiB ublk null device (one queue,
//! depth 128), prints its block device, and serves it until STOPFILE
//! exists. MODE picks how requests travel between the kernel and the
//! queue, which is all a null target costs:
//!
//! - `classic`: one FETCH/COMMIT command per tag, data copied by ublk to
//!   and from a buffer per tag (ublk-cow's copy mode);
//! - `zero-copy`: the same commands, with the request's pages registered
//!   in the queue's ring (`UBLK_F_AUTO_BUF_REG`, ublk-cow's default where
//!   the kernel has it);
//! - `batch`: `UBLK_F_BATCH_IO`: multishot fetches that hand over many
//!   tags at once, and commits of many tags in one command (copy mode:
//!   the transport does not allow the other two).
//!
//! Reads complete without touching the buffer, writes are dropped.

use libublk::io::{
    BufDescList, UblkBatchBuffers, UblkBatchCompletion, UblkBatchConfig, UblkBatchQueue, UblkDev,
    UblkIOCtx, UblkQueue,
};
use libublk::{BufDesc, UblkFlags, UblkIORes, ctrl::UblkCtrl, ctrl::UblkCtrlBuilder, sys};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Classic,
    ZeroCopy,
    Batch,
}

/// The bytes a request completes with: all of them for READ and WRITE.
fn result_of(q: &UblkQueue, tag: u16) -> i32 {
    let iod = q.get_iod(tag);
    match iod.op_flags & 0xff {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => (iod.nr_sectors << 9) as i32,
        sys::UBLK_IO_OP_FLUSH => 0,
        _ => -libc::EOPNOTSUPP,
    }
}

fn classic_queue(qid: u16, dev: &UblkDev) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let b = bufs.clone();
    let handler = move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let res = result_of(q, tag);
        let desc = BufDesc::Slice(b[tag as usize].as_slice());
        q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res)))
            .expect("commit");
    };
    let q = UblkQueue::new(qid, dev)
        .expect("queue")
        .submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs)))
        .expect("fetch");
    q.wait_and_handle_io(handler);
}

fn zero_copy_queue(qid: u16, dev: &UblkDev) {
    let regs: Rc<Vec<_>> = Rc::new(
        (0..dev.dev_info.queue_depth)
            .map(|tag| sys::ublk_auto_buf_reg {
                index: tag,
                flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
                ..Default::default()
            })
            .collect(),
    );
    let r = regs.clone();
    let handler = move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let res = result_of(q, tag);
        q.complete_io_cmd_unified(
            tag,
            BufDesc::AutoReg(r[tag as usize]),
            Ok(UblkIORes::Result(res)),
        )
        .expect("commit");
    };
    let q = UblkQueue::new(qid, dev)
        .expect("queue")
        .submit_fetch_commands_unified(BufDescList::AutoRegs(&regs))
        .expect("fetch");
    q.wait_and_handle_io(handler);
}

fn batch_queue(qid: u16, dev: &UblkDev) {
    let queue = UblkQueue::new(qid, dev).expect("queue");
    let bufs = dev.alloc_queue_io_bufs();
    let mut batch = UblkBatchQueue::new(
        &queue,
        UblkBatchBuffers::IoBufs(bufs),
        UblkBatchConfig::new(),
    )
    .expect("batch queue");
    let mut pending = Vec::new();
    loop {
        let mut failed = None;
        queue
            .flush_and_wake_io_tasks(
                |_, cqe, _| {
                    let r = batch.handle_cqe(cqe, |_, tags| {
                        for &tag in tags {
                            pending.push(UblkBatchCompletion::new(tag, result_of(&queue, tag)));
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        failed = Some(e);
                    }
                },
                1,
            )
            .expect("wait");
        if let Some(e) = failed {
            panic!("batch queue: {e}");
        }
        if !pending.is_empty() && batch.try_submit_completions(&pending).expect("commit") {
            pending.clear();
        }
        if batch.try_begin_shutdown().expect("shutdown") && batch.is_shutdown_complete() {
            break;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: batch-null classic|zero-copy|batch STOPFILE";
    let mode = match args.get(1).map(String::as_str) {
        Some("classic") => Mode::Classic,
        Some("zero-copy") => Mode::ZeroCopy,
        Some("batch") => Mode::Batch,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let Some(stop) = args.get(2).map(PathBuf::from) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let flags = match mode {
        Mode::Classic => 0,
        Mode::ZeroCopy => sys::UBLK_F_AUTO_BUF_REG as u64,
        Mode::Batch => sys::UBLK_F_BATCH_IO as u64,
    };
    if flags != 0 && UblkCtrl::get_features().unwrap_or_default() & flags == 0 {
        eprintln!(
            "batch-null: this kernel's ublk_drv does not offer the flags of this mode ({flags:#x})"
        );
        std::process::exit(1);
    }
    let ctrl = UblkCtrlBuilder::default()
        .name("batch-null")
        .nr_queues(1)
        .depth(128)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .ctrl_flags(flags)
        .build()
        .expect("add");
    let init = |dev: &mut UblkDev| {
        dev.set_default_params(1 << 30);
        Ok(())
    };
    let queue = move |qid: u16, dev: &UblkDev| match mode {
        Mode::Classic => classic_queue(qid, dev),
        Mode::ZeroCopy => zero_copy_queue(qid, dev),
        Mode::Batch => batch_queue(qid, dev),
    };
    ctrl.run_target(init, queue, move |ctrl: &UblkCtrl| {
        println!("/dev/ublkb{}", ctrl.dev_info().dev_id);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        while !stop.exists() {
            std::thread::sleep(Duration::from_millis(100));
        }
        ctrl.kill_dev().expect("kill");
    })
    .expect("run");
}
