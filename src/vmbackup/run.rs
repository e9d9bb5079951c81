//! The run across VMs: its checks and writer lock, the write rates and
//! the read order (busiest first), the common snapshot time step by step
//! over every VM, then the read workers, `--jobs` VMs at a time, and a
//! stop flag honoured between steps. Each VM's own steps are in `vm`,
//! `snapshot` and `publish`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::options::{Options, ReadOrder};
use super::read::INTERRUPTED;
use super::report::{Clock, Summary};
use super::vm::Vm;
use crate::error::{Error, Result};
use crate::repo::locks::WriterLock;
use crate::repo::Repository;

/// Indexes of `rates` busiest first; equal rates keep their given order.
pub fn order_by_rate(rates: &[(String, f64)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..rates.len()).collect();
    idx.sort_by(|&a, &b| rates[b].1.total_cmp(&rates[a].1));
    idx
}

fn check(opts: &Options) -> Result<()> {
    if opts.vms.is_empty() {
        return Err(Error::invalid("no VM given"));
    }
    if opts.jobs == 0 {
        return Err(Error::invalid("--jobs must be at least 1"));
    }
    let (mut names, mut sockets) = (HashSet::new(), HashSet::new());
    for v in &opts.vms {
        crate::util::validate_name("VM name", &v.name)?;
        if !names.insert(&v.name) {
            return Err(Error::invalid(format!("VM {} is given twice", v.name)));
        }
        // QEMU serves one QMP client per socket: a second would hang.
        if !sockets.insert(&v.qmp) {
            return Err(Error::invalid(format!(
                "QMP socket {} is given twice",
                v.qmp.display()
            )));
        }
    }
    Ok(())
}

/// Backs up every VM of `opts` (see the `vmbackup` module docs). Errors of single
/// VMs are in the summary; an error here means nothing was attempted.
pub fn backup_vms(repo: &Arc<Repository>, opts: &Options) -> Result<Summary> {
    backup_vms_until(repo, opts, &AtomicBool::new(false))
}

/// [`backup_vms`] that a set `stop` (a signal) ends early through the
/// normal cleanup: before the snapshot nothing is paused; once VMs are
/// stopped, the snapshot step completes (views opened, every VM resumed
/// and thawed) and then every VM not yet backed up fails with
/// [`INTERRUPTED`], its views closed; a read under way ends at its next
/// chunk.
pub fn backup_vms_until(
    repo: &Arc<Repository>,
    opts: &Options,
    stop: &AtomicBool,
) -> Result<Summary> {
    check(opts)?;
    let interrupted = || stop.load(Ordering::SeqCst);
    let interrupt = |vm: &mut Vm, clock: &Clock| {
        if vm.ok() {
            vm.fail(clock, Error::new(crate::error::ErrorKind::Io, INTERRUPTED));
        }
    };
    // Held from before any base is read until the last manifest: no
    // collection sweeps meanwhile (`repo::locks`).
    let names: Vec<&str> = opts.vms.iter().map(|v| v.name.as_str()).collect();
    let lock = WriterLock::acquire(repo, &names.join(","))?;
    let clock = Clock {
        start: Instant::now(),
        hook: opts.hook.clone(),
    };
    let run = crate::repo::random_hex(3);
    let mut vms: Vec<Vm> = (opts.vms.iter().cloned().enumerate())
        .map(|(i, s)| Vm::new(i, s))
        .collect();

    // 1. Connect, measure, order.
    for vm in &mut vms {
        if let Err(e) = vm.prepare().and_then(|()| vm.check_identity(repo)) {
            vm.fail(&clock, e);
        } else if let Some(b) = vm.spec.base.clone() {
            if let Err(e) = vm.use_base(&b, opts.chunk_size) {
                vm.fail(&clock, e);
            }
        } else if opts.incremental {
            vm.plan(repo, opts.chunk_size);
        }
    }
    let rates: Vec<(usize, Result<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (vms.iter_mut().filter(|v| v.ok()))
            .map(|vm| {
                let i = vm.index;
                let h = s.spawn(|| vm.q().and_then(|q| q.write_rate(opts.rate_window)));
                (i, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(i, h)| (i, h.join().expect("rate thread")))
            .collect()
    });
    for (i, r) in rates {
        match r {
            Ok(r) => vms[i].report.write_rate = r,
            Err(e) => vms[i].fail(&clock, e.context("measuring the write rate")),
        }
    }
    let live: Vec<usize> = (0..vms.len()).filter(|&i| vms[i].ok()).collect();
    let rates: Vec<(String, f64)> = live
        .iter()
        .map(|&i| (vms[i].spec.name.clone(), vms[i].report.write_rate))
        .collect();
    let mut by_rate = order_by_rate(&rates);
    if opts.order == ReadOrder::IdleFirst {
        by_rate.reverse();
    }
    let order: Vec<usize> = by_rate.into_iter().map(|k| live[k]).collect();
    for (pos, &i) in order.iter().enumerate() {
        vms[i].report.order = Some(pos + 1);
    }

    if interrupted() {
        for vm in &mut vms {
            interrupt(vm, &clock);
        }
    }
    let order: Vec<usize> = order.into_iter().filter(|&i| vms[i].ok()).collect();

    // 2. The common snapshot time.
    for &i in &order {
        vms[i].freeze(&clock, opts.agent_timeout);
    }
    for &i in &order {
        if !vms[i].ok() {
            continue; // failed at its freeze: not stopped
        }
        if let Err(e) = vms[i].stop(&clock) {
            vms[i].fail(&clock, e);
            // Not paused for the others' views: it takes no part.
            vms[i].resume_or_fail(&clock);
        }
    }
    for &i in &order {
        if vms[i].ok() {
            if let Err(e) = vms[i].open_views(&clock, &run, opts.chunk_size) {
                vms[i].fail(&clock, e);
            }
        }
    }
    let snapshot = order.iter().any(|&i| vms[i].ok()).then(|| {
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    });
    for &i in &order {
        vms[i].resume_or_fail(&clock);
    }
    for &i in &order {
        vms[i].thaw(&clock, opts.agent_timeout);
    }
    if interrupted() {
        for &i in &order {
            interrupt(&mut vms[i], &clock);
        }
    }

    // 3. and 4. Read busiest first, `jobs` at a time, release each early.
    let queue: Mutex<VecDeque<usize>> =
        Mutex::new(order.iter().copied().filter(|&i| vms[i].ok()).collect());
    let slots: Vec<Mutex<Vm>> = vms.into_iter().map(Mutex::new).collect();
    let snap = snapshot.clone().unwrap_or_default();
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.min(slots.len()) {
            s.spawn(|| loop {
                let Some(i) = queue.lock().expect("queue lock").pop_front() else {
                    break;
                };
                let mut vm = slots[i].lock().expect("VM lock");
                if interrupted() {
                    interrupt(&mut vm, &clock);
                    continue;
                }
                vm.read(&clock, repo, &lock, opts, &snap, stop);
            });
        }
    });
    Ok(Summary {
        run_id: run,
        snapshot_time: snapshot,
        jobs: opts.jobs,
        chunk_size: opts.chunk_size,
        vms: slots
            .into_iter()
            .map(|m| m.into_inner().expect("VM lock").report)
            .collect(),
    })
}
