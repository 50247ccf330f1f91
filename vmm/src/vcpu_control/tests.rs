//! The pause protocol's tests: real threads racing pause, resume, idle
//! waits and stop.

use super::*;
use std::sync::Arc;

#[test]
fn pause_waits_for_running_vcpus_and_counts_waiters_as_held() {
    install_kick_handler().unwrap();
    let c = Arc::new(VcpuControl::new(3, true));
    // vCPU 0 "runs" a loop that checks the flag like a real vCPU does.
    let c0 = c.clone();
    let t = std::thread::spawn(move || {
        c0.register_thread(0);
        loop {
            clear_immediate_exit();
            if c0.needs_attention() && c0.hold(0) == Gate::Stop {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        c0.mark_exited(0);
    });
    for _ in 0..50 {
        c.pause().unwrap();
        assert_eq!(c.statuses()[0], VcpuStatus::Held);
        assert_eq!(c.pause(), Err(PauseError::AlreadyPaused));
        c.resume().unwrap();
        while c.last_resume_latency().is_none() {
            std::thread::yield_now();
        }
    }
    assert_eq!(c.resume(), Err(PauseError::NotPaused));
    c.request_stop(VmExit::Poweroff(7));
    t.join().unwrap();
    // vCPU 0 exited: pausing must fail, not hang.
    assert!(c.pause().is_err());
    assert_eq!(c.exit(), Some(VmExit::Poweroff(7)));
}

#[test]
fn idle_wait_ends_on_wake_and_stop() {
    let c = Arc::new(VcpuControl::new(1, false));
    let c1 = c.clone();
    let t = std::thread::spawn(move || c1.idle_wait(0, Duration::from_secs(30)));
    while c.statuses()[0] != VcpuStatus::Waiting {
        std::thread::yield_now();
    }
    // A waiting vCPU is held: pause returns at once.
    c.pause().unwrap();
    c.resume().unwrap();
    c.wake_waiters();
    assert_eq!(t.join().unwrap(), Gate::Run);
    let c2 = c.clone();
    let t = std::thread::spawn(move || c2.idle_wait(0, Duration::from_secs(30)));
    c.request_stop(VmExit::Shutdown);
    assert_eq!(t.join().unwrap(), Gate::Stop);
}

#[test]
fn pause_in_progress_sees_a_vcpu_start_an_idle_wait() {
    // A running vCPU that goes idle instead of noticing the kick (it
    // was on its way to PORT_WAIT) must still complete the pause.
    let c = Arc::new(VcpuControl::new(1, false));
    let c1 = c.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        c1.idle_wait(0, Duration::from_secs(30))
    });
    c.pause().expect("the idle vCPU counts as held");
    assert_eq!(c.statuses()[0], VcpuStatus::Waiting);
    c.wake_waiters();
    // Woken while paused: parks until resumed.
    while c.statuses()[0] != VcpuStatus::Held {
        std::thread::yield_now();
    }
    c.resume().expect("resume");
    assert_eq!(t.join().expect("vCPU thread"), Gate::Run);
    assert_eq!(c.statuses()[0], VcpuStatus::Running);
}

#[test]
fn wake_before_wait_is_not_lost() {
    let c = VcpuControl::new(1, false);
    c.wake_waiters();
    let started = Instant::now();
    assert_eq!(c.idle_wait(0, Duration::from_secs(30)), Gate::Run);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn aps_start_once() {
    let c = Arc::new(VcpuControl::new(2, true));
    let c1 = c.clone();
    let t = std::thread::spawn(move || c1.wait_for_start(1));
    assert!(c.start_aps(0x1234));
    assert!(!c.start_aps(0x9999));
    assert_eq!(t.join().unwrap(), Some(0x1234));
}

#[test]
fn exit_statuses() {
    assert_eq!(VmExit::Poweroff(42).exit_status(), 42);
    assert_eq!(VmExit::GuestCrash(String::new()).exit_status(), 3);
    assert_eq!(VmExit::Error(String::new()).exit_status(), 1);
    assert_eq!(VmExit::Reboot.exit_status(), 0);
}
