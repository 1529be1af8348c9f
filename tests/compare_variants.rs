//! Runs the flagship example's core in quick mode: every method must improve task-B
//! accuracy over the pretrained model, and train exactly its closed-form parameter count.

#[allow(dead_code)]
#[path = "../examples/compare_variants/core.rs"]
mod core;
#[allow(dead_code)]
#[path = "../examples/compare_variants/methods.rs"]
mod methods;
#[allow(dead_code)]
#[path = "../examples/compare_variants/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../examples/compare_variants/tasks.rs"]
mod tasks;

struct Silent;

impl core::Progress for Silent {
    fn start(&mut self, _: &str, _: usize) {}
    fn step(&mut self, _: f64) {}
    fn finish(&mut self) {}
}

#[test]
fn every_variant_adapts_and_counts_its_parameters() {
    let settings = core::Settings::quick(0);
    let (pre, results) = core::run(&settings, &methods::Method::ALL, &mut Silent).unwrap();
    assert!(
        pre.acc_task_b < 0.5,
        "the pretrained model should be poor on task B, got {}",
        pre.acc_task_b
    );
    assert_eq!(results.len(), methods::Method::ALL.len());
    for r in &results {
        assert!(
            r.acc_after > r.acc_before + 0.1,
            "{}: accuracy {} -> {}",
            r.method.name(),
            r.acc_before,
            r.acc_after
        );
        assert_eq!(
            r.trainable_params,
            r.expected_params,
            "{}: trainable parameters vs closed form",
            r.method.name()
        );
        assert!(r.losses.iter().all(|l| l.is_finite()));
    }
}
