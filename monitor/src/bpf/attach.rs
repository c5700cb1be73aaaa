//! Attaching and detaching uprobes: all of a plan's points or none.
//!
//! Task hooks go on one process (`UProbeScope::OneProcess`: the kernel writes the breakpoint
//! into that process's pages only, so other processes running the same binary are not
//! slowed down) or on the executable for `--exe`. Heap programs always go on one process,
//! also in a shared libc, which other processes map too. Links are owned by the caller and
//! detached when a process goes away; if the daemon dies, the kernel drops them with its file
//! descriptors, leaving nothing behind.

use std::num::NonZeroU32;
use std::path::Path;

use aya::programs::uprobe::{
    UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope,
};

use super::loader::{ProbeError, Probes};
use super::plan::{self, HeapAttachPoint};
use crate::discovery::TargetImage;

/// Threads that close links at once in [`Probes::detach`].
const DETACH_THREADS: usize = 32;

/// One attached hook point, detachable.
#[derive(Debug)]
pub struct AttachedLink {
    program: &'static str,
    id: UProbeLinkId,
}

impl AttachedLink {
    /// The name of the program attached (`monitor_common::names::program`).
    pub fn program(&self) -> &'static str {
        self.program
    }
}

/// One uprobe to attach: which program, where, and with which cookie.
struct AttachRequest<'a> {
    program: &'static str,
    target: &'a Path,
    file_offset: u64,
    cookie: Option<u64>,
    symbol: &'a str,
}

fn scope(pid: Option<u32>) -> UProbeScope {
    match pid.and_then(NonZeroU32::new) {
        Some(pid) => UProbeScope::OneProcess(pid),
        None => UProbeScope::AllProcesses,
    }
}

impl Probes {
    /// Attaches the task hook at every hook point of `image` in process `pid` (or, with
    /// `pid == None`, in every process that runs `target`).
    pub fn attach_tasks(
        &mut self,
        image: &TargetImage,
        target: &Path,
        pid: Option<u32>,
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        let points = plan::task_points(image)?;
        let requests: Vec<AttachRequest<'_>> = points
            .iter()
            .map(|point| AttachRequest {
                program: point.program,
                target,
                file_offset: point.file_offset,
                cookie: Some(point.cookie),
                symbol: &point.symbol,
            })
            .collect();
        self.attach_all(&requests, scope(pid))
    }

    /// Attaches heap programs in process `pid`.
    pub fn attach_heap(
        &mut self,
        pid: u32,
        points: &[HeapAttachPoint],
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        let requests: Vec<AttachRequest<'_>> = points
            .iter()
            .map(|point| AttachRequest {
                program: point.program.name(),
                target: &point.target,
                file_offset: point.file_offset,
                cookie: (point.arg_cookie != 0).then_some(point.arg_cookie),
                symbol: &point.symbol,
            })
            .collect();
        self.attach_all(&requests, scope(Some(pid)))
    }

    /// Places a uprobe on `symbol` in `library` for this process alone and removes it: what
    /// `leakscope doctor` proves the kernel and the privileges allow.
    pub fn try_uprobe(
        &mut self,
        library: &std::path::Path,
        symbol: &str,
    ) -> Result<(), ProbeError> {
        let program = self.program(monitor_common::names::program::HEAP_FREE_ENTRY)?;
        program.load()?;
        let link = program
            .attach(symbol, library, UProbeScope::CallingProcess)
            .map_err(|source| ProbeError::Attach {
                symbol: symbol.to_string(),
                offset: 0,
                target: library.display().to_string(),
                source: Box::new(source),
            })?;
        program.detach(link)?;
        Ok(())
    }

    /// Attaches every request, or none: on the first failure the ones already attached are
    /// detached again, so nothing is left half-attached.
    fn attach_all(
        &mut self,
        requests: &[AttachRequest<'_>],
        scope: UProbeScope,
    ) -> Result<Vec<AttachedLink>, ProbeError> {
        let mut links = Vec::with_capacity(requests.len());
        for request in requests {
            let attached = self.program(request.program).and_then(|program| {
                let point = UProbeAttachPoint {
                    location: UProbeAttachLocation::AbsoluteOffset(request.file_offset),
                    cookie: request.cookie,
                };
                program
                    .attach(point, request.target, scope)
                    .map(|id| AttachedLink {
                        program: request.program,
                        id,
                    })
                    .map_err(|source| ProbeError::Attach {
                        symbol: request.symbol.to_string(),
                        offset: request.file_offset,
                        target: request.target.display().to_string(),
                        source: Box::new(source),
                    })
            });
            match attached {
                Ok(link) => links.push(link),
                Err(err) => {
                    self.detach(links);
                    return Err(err);
                }
            }
        }
        Ok(links)
    }

    /// Detaches `links`, closing them on several threads. The kernel waits out an RCU grace
    /// period to unregister each uprobe (about 80 ms here) and mostly serializes those waits,
    /// so this only trims the stop (30 hook points: 3.2 s one by one, 2.5 s so, measured);
    /// a prompt stop needs multi-uprobe links (one grace period for all), which aya 0.14
    /// does not have.
    pub fn detach(&mut self, links: Vec<AttachedLink>) {
        let mut owned: Vec<Vec<UProbeLink>> = (0..links.len().min(DETACH_THREADS))
            .map(|_| Vec::new())
            .collect();
        for (i, link) in links.into_iter().enumerate() {
            // A link whose process already exited may be gone: nothing to undo then.
            if let Ok(taken) = self
                .program(link.program)
                .and_then(|program| Ok(program.take_link(link.id)?))
            {
                owned[i % DETACH_THREADS].push(taken);
            }
        }
        std::thread::scope(|scope| {
            for batch in owned {
                // Dropping a link closes its fd, which unregisters the uprobe.
                scope.spawn(move || drop(batch));
            }
        });
    }
}
