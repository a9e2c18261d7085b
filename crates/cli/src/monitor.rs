//! `kiln monitor`: GPU utilization, memory, clocks, power, temperature and throttle reasons
//! through NVML, sampled at an interval.

use std::time::Duration;

use kiln_cuda::monitor::{Monitor, Sample};

use crate::common::{table, CliError, CliResult};
use crate::MonitorArgs;

const HEADER: [&str; 11] = [
    "gpu",
    "name",
    "util_%",
    "mem_util_%",
    "mem_used_MiB",
    "mem_total_MiB",
    "sm_MHz",
    "mem_MHz",
    "power_W",
    "temp_C",
    "throttle",
];

fn row(s: &Sample) -> Vec<String> {
    vec![
        s.index.to_string(),
        s.name.clone(),
        s.gpu_util_pct.to_string(),
        s.mem_util_pct.to_string(),
        (s.mem_used_bytes >> 20).to_string(),
        (s.mem_total_bytes >> 20).to_string(),
        s.sm_clock_mhz.to_string(),
        s.mem_clock_mhz.to_string(),
        format!("{:.1}", s.power_w),
        s.temperature_c.to_string(),
        s.throttle.clone(),
    ]
}

/// Runs `kiln monitor`.
pub fn run(a: MonitorArgs) -> CliResult<()> {
    let mon = Monitor::open().map_err(|e| CliError(e.to_string()))?;
    let n = mon.count()?;
    if n == 0 {
        return Err(CliError("no GPU to monitor: NVML reports 0 devices".into()));
    }
    if a.csv {
        println!("{}", HEADER.join(","));
    }
    let mut done = 0u64;
    loop {
        let mut rows = vec![HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
        for i in 0..n {
            let s = mon.sample(i)?;
            if a.csv {
                println!("{}", row(&s).join(","));
            } else {
                rows.push(row(&s));
            }
        }
        if !a.csv {
            print!("{}", table(&rows));
        }
        done += 1;
        if a.count.is_some_and(|c| done >= c) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(a.interval_ms));
    }
}
