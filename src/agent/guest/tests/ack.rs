//! The end of a backup whose host falls behind the stream.

use super::*;

#[test]
fn the_agent_waits_for_a_host_that_acknowledges_long_after_the_end_frame() {
    let w = World::new();
    let t = w.tree();
    let _one = ONE_AGENT.lock().unwrap_or_else(|p| p.into_inner());
    let (guest, host) = UnixStream::pair().unwrap();
    let container = w.dir.path().join("container");
    let job = Job::Backup {
        paths: vec![t.to_str().unwrap().to_string()],
        hooks: vec![],
        allow_quiesced_stream: false,
        holes: true,
        keepalive: true,
    };
    let agent = std::thread::spawn(move || {
        let r = run_on(
            std::fs::File::from(std::os::fd::OwnedFd::from(guest)),
            &container,
            &job,
        );
        (r, Instant::now())
    });
    // Longer than agents before keep-alives waited (30 s), and ten times
    // the silence this agent allows (keep-alives come meanwhile).
    let delay = Duration::from_secs(32);
    crate::agent::backup::ACK_DELAY.set(delay);
    let opts = options(Duration::from_secs(60), Duration::from_secs(600));
    let deadline = Deadline::start(opts.idle_timeout, opts.max_duration);
    let got = receive(&w.repo, &host, deadline, &target(), &opts, &|_| {});
    let acked = Instant::now();
    crate::agent::backup::ACK_DELAY.set(Duration::ZERO);
    let c = got.unwrap();
    assert!(c.entries.iter().any(|e| e.path.ends_with("/data.db")));
    let (r, ended) = agent.join().unwrap();
    r.unwrap();
    assert!(
        ended + Duration::from_millis(100) >= acked,
        "the agent ended {:?} before the host's acknowledgement",
        acked - ended
    );
    drop(host);
}
