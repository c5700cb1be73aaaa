//! What `bench --http` writes: `summary.json`, the Markdown table and the SVG chart, from
//! every round's measurements.

use super::*;

pub(super) struct Summary {
    pub(super) results: Results,
    pub(super) rounds: usize,
    pub(super) seconds: u64,
    pub(super) pinning: String,
    pub(super) load_start: String,
    pub(super) load_end: String,
    pub(super) cpus: usize,
    pub(super) memleak_note: String,
    /// Configurations that could not run, and why.
    pub(super) left_out: BTreeMap<Config, String>,
    pub(super) wall_seconds: f64,
    pub(super) quick: bool,
}

/// The configurations compared with the baseline, in column order: all but the baseline.
const COMPARED: &[Config] = Config::ALL.split_at(1).1;

/// The configurations with a monitor: all but the baseline and its unmonitored copy.
const MONITORED: &[Config] = Config::ALL.split_at(2).1;

impl Summary {
    pub(super) fn all_runs() -> Vec<(usize, Conn)> {
        (0..ROUTES.len())
            .flat_map(|r| Conn::ALL.map(|c| (r, c)))
            .collect()
    }

    fn ratios(&self, route: usize, conn: Conn) -> Value {
        let mut ratios = serde_json::Map::new();
        for &config in COMPARED {
            ratios.insert(
                config.key().into(),
                ratio(&self.results, config, route, conn)
                    .map_or(Value::Null, |r| json!((r * 1000.0).round() / 1000.0)),
            );
        }
        Value::Object(ratios)
    }

    fn rps(&self, route: usize, conn: Conn) -> Value {
        let mut rps = serde_json::Map::new();
        for config in Config::ALL {
            rps.insert(
                config.key().into(),
                opt(median_rps(&self.results, config, route, conn).map(f64::round)),
            );
        }
        Value::Object(rps)
    }

    /// Per monitor: CPU per event, events and resident memory (medians over rounds).
    fn daemon(&self) -> Value {
        let runs = Self::all_runs();
        let mut daemon = serde_json::Map::new();
        for &config in MONITORED {
            let Some(rounds) = self.results.get(&config) else {
                daemon.insert(config.key().into(), Value::Null);
                continue;
            };
            let per_event: Vec<f64> = rounds
                .iter()
                .filter_map(|r| cpu_per_event_ns(r, &runs))
                .collect();
            let rss: Vec<f64> = rounds.iter().filter_map(|r| r.monitor_rss_mib).collect();
            let cpu_share: Vec<f64> = rounds
                .iter()
                .map(|r| {
                    let cpu: u64 = r.runs.values().filter_map(|run| run.monitor_cpu_ns).sum();
                    cpu as f64 / (runs.len() as f64 * self.seconds as f64 * 1e9) * 100.0
                })
                .collect();
            let events: Vec<f64> = rounds
                .iter()
                .map(|r| r.runs.values().filter_map(|run| run.events).sum::<u64>() as f64)
                .collect();
            let mut entry = json!({
                "cpu_ns_per_event": opt(median(&per_event)),
                "cpu_percent_of_a_core_under_load": opt(median(&cpu_share)),
                "rss_mib_at_end": opt(median(&rss)),
            });
            if !config.runs_bcc() {
                entry["events_per_round"] = opt(median(&events));
            }
            daemon.insert(config.key().into(), entry);
        }
        Value::Object(daemon)
    }

    pub(super) fn json(&self) -> Value {
        let mut routes = serde_json::Map::new();
        for (index, route) in ROUTES.iter().enumerate() {
            let mut entry = serde_json::Map::new();
            entry.insert("path".into(), json!(route.path));
            entry.insert("what".into(), json!(route.what));
            for conn in Conn::ALL {
                let runs = [(index, conn)];
                let per_event: serde_json::Map<String, Value> = MONITORED
                    .iter()
                    .filter(|c| !c.runs_bcc())
                    .map(|c| {
                        let values: Vec<f64> = self
                            .results
                            .get(c)
                            .map(|rounds| {
                                rounds
                                    .iter()
                                    .filter_map(|r| cpu_per_event_ns(r, &runs))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (c.key().to_string(), opt(median(&values)))
                    })
                    .collect();
                let p99: serde_json::Map<String, Value> = Config::ALL
                    .iter()
                    .map(|c| {
                        let values: Vec<f64> = self
                            .results
                            .get(c)
                            .map(|rounds| {
                                rounds
                                    .iter()
                                    .filter_map(|r| r.runs.get(&(index, conn))?.p99_us)
                                    .collect()
                            })
                            .unwrap_or_default();
                        (c.key().to_string(), opt(median(&values)))
                    })
                    .collect();
                let errors: u64 = self
                    .results
                    .values()
                    .flatten()
                    .filter_map(|r| r.runs.get(&(index, conn)))
                    .map(|run| run.errors)
                    .sum();
                // Each round's own ratio, for the spread behind the medians.
                let per_round: serde_json::Map<String, Value> = COMPARED
                    .iter()
                    .map(|c| {
                        let ratios: Vec<Value> =
                            match (self.results.get(c), self.results.get(&Config::Baseline)) {
                                (Some(m), Some(b)) => m
                                    .iter()
                                    .zip(b)
                                    .filter_map(|(m, b)| {
                                        let m = m.runs.get(&(index, conn))?.rps;
                                        let b = b.runs.get(&(index, conn))?.rps;
                                        Some(json!((m / b * 1000.0).round() / 1000.0))
                                    })
                                    .collect(),
                                _ => Vec::new(),
                            };
                        (c.key().to_string(), Value::Array(ratios))
                    })
                    .collect();
                entry.insert(
                    conn.key().into(),
                    json!({
                        "ratios": self.ratios(index, conn),
                        "ratios_per_round": per_round,
                        "rps": self.rps(index, conn),
                        "p99_latency_us": p99,
                        "daemon_cpu_ns_per_event": per_event,
                        "wrk_errors": errors,
                    }),
                );
            }
            routes.insert(route.key.into(), Value::Object(entry));
        }
        json!({
            "ratios": self.ratios(0, Conn::KeepAlive),
            "rps": self.rps(0, Conn::KeepAlive),
            "headline": format!("{} ({}), keep-alive: requests per second relative to the \
                                 unmonitored service, medians", ROUTES[0].path, ROUTES[0].key),
            "daemon": self.daemon(),
            "routes": routes,
            "memleak": {
                "ran": self.results.contains_key(&Config::Memleak),
                "note": self.memleak_note,
            },
            "left_out": self
                .left_out
                .iter()
                .map(|(config, why)| (config.key().to_string(), json!(why)))
                .collect::<serde_json::Map<_, _>>(),
            "setup": {
                "quick": self.quick,
                "rounds": self.rounds,
                "seconds_per_run": self.seconds,
                "pinning": self.pinning,
                "cpus": self.cpus,
                "kernel": crate::bench_tools::kernel_release(),
                "load_average_start": self.load_start,
                "load_average_end": self.load_end,
                "wall_seconds": self.wall_seconds.round(),
            },
        })
    }

    pub(super) fn markdown(&self) -> String {
        let cell = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
        let mut md = String::new();
        md.push_str(&format!(
            "Requests per second relative to the unmonitored service (median of {} round(s), \
             {} s per run, {}). {}. Load average {} at the start, {} at the end ({} CPUs); \
             wall time {:.0} s.\n\n",
            self.rounds,
            self.seconds,
            if self.quick { "`--quick`" } else { "full" },
            self.pinning,
            self.load_start,
            self.load_end,
            self.cpus,
            self.wall_seconds
        ));
        md.push_str("| route | connections | baseline req/s |");
        for config in COMPARED {
            md.push_str(&format!(" {} |", config.label()));
        }
        md.push_str(&format!(
            "\n|---|---|---|{}\n",
            "---|".repeat(COMPARED.len())
        ));
        for (index, route) in ROUTES.iter().enumerate() {
            for conn in Conn::ALL {
                md.push_str(&format!(
                    "| `{}` ({}) | {} | {} |",
                    route.path,
                    route.what,
                    conn.label(),
                    median_rps(&self.results, Config::Baseline, index, conn)
                        .map_or("–".into(), |x| format!("{x:.0}")),
                ));
                for &config in COMPARED {
                    md.push_str(&format!(
                        " {} |",
                        cell(ratio(&self.results, config, index, conn))
                    ));
                }
                md.push('\n');
            }
        }
        md.push_str("\n| monitor | CPU per event | CPU under load | resident memory at the end |\n|---|---|---|---|\n");
        let daemon = self.daemon();
        for &config in MONITORED {
            let d = &daemon[config.key()];
            let field = |k: &str| d.get(k).and_then(Value::as_f64);
            md.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                config.label(),
                field("cpu_ns_per_event").map_or("–".into(), |x| format!("{x:.0} ns")),
                field("cpu_percent_of_a_core_under_load")
                    .map_or("–".into(), |x| format!("{x:.1} % of a core")),
                field("rss_mib_at_end").map_or("–".into(), |x| format!("{x:.1} MiB")),
            ));
        }
        md.push_str(&format!(
            "\n2nd unmonitored copy: another service without a monitor, measured like the \
             others; its distance from 1.00 is the noise of this run. \
             CPU per event: the monitor's utime+stime (/proc, 10 ms ticks) over all runs, \
             divided by `leakscope_events_total` + `leakscope_heap_events_total` over them. \
             memleak: {}. task census: `--tasks census`, no task hook at all; the census \
             reads the runtime's task lists every 10 s (no event, so no CPU per event). \
             heap probes, empty: bcc programs that do nothing, on exactly the probe points \
             `--heap exact` uses (same offsets, uprobes and uretprobes): the traps alone, the \
             floor under any heap tracking that probes every call.\n",
            self.memleak_note,
        ));
        for (config, why) in &self.left_out {
            md.push_str(&format!("\nLeft out: {}: {why}\n", config.label()));
        }
        md
    }

    /// A grouped bar chart: per route and connection mode, each monitor's throughput ratio.
    pub(super) fn svg(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;
        let groups: Vec<(usize, Conn)> = Self::all_runs();
        let colors: [RGBColor; COMPARED.len()] = [
            RGBColor(0x99, 0x99, 0x99),
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xff, 0x7f, 0x0e),
            RGBColor(0xff, 0xbb, 0x78),
            RGBColor(0x2c, 0xa0, 0x2c),
            RGBColor(0x94, 0x67, 0xbd),
            RGBColor(0x8c, 0x56, 0x4b),
            RGBColor(0xd6, 0x27, 0x28),
            RGBColor(0x17, 0x17, 0x17),
        ];
        let root = SVGBackend::new(path, (1000, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "leakscope HTTP benchmark: requests/s relative to the unmonitored service",
                ("sans-serif", 18),
            )
            .margin(12)
            .y_label_area_size(50)
            .x_label_area_size(10)
            .build_cartesian_2d(0f64..groups.len() as f64, 0f64..1.7)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("ratio to baseline")
            .draw()?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (groups.len() as f64, 1.0)],
            BLACK.mix(0.4),
        )))?;
        let centered = plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        );
        let label_style = TextStyle::from(("sans-serif", 12).into_font()).pos(centered);
        let value_style = TextStyle::from(("sans-serif", 10).into_font()).pos(centered);
        for (g, (route, conn)) in groups.iter().enumerate() {
            let x = g as f64 + 0.5;
            chart.draw_series([
                Text::new(
                    ROUTES[*route].path.to_string(),
                    (x, 1.32),
                    label_style.clone(),
                ),
                Text::new(conn.label().to_string(), (x, 1.25), label_style.clone()),
            ])?;
        }
        let width = 0.8 / COMPARED.len() as f64;
        for (i, config) in COMPARED.iter().enumerate() {
            let color = colors[i];
            let bars: Vec<(f64, f64)> = groups
                .iter()
                .enumerate()
                .filter_map(|(g, (route, conn))| {
                    let r = ratio(&self.results, *config, *route, *conn)?;
                    Some((g as f64 + 0.1 + i as f64 * width, r))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|&(x, r)| {
                    Rectangle::new([(x, 0.0), (x + width * 0.9, r.min(1.12))], color.filled())
                }))?
                .label(config.label())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            chart.draw_series(bars.iter().map(|&(x, r)| {
                Text::new(
                    format!("{r:.2}"),
                    (x + width * 0.45, r.min(1.12) + 0.03),
                    value_style.clone(),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        root.present()?;
        Ok(())
    }
}
