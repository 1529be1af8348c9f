//! PEFT's target rules: hand-worked cases from PEFT's definitions, and the fixtures'
//! adapted modules (chosen by real PEFT) against lorakit's plan.

use crate::peft_common::{fixture, layer_specs};
use candle_core::Device;
use lorakit::model::{ModuleSelector, Pattern, RankAlpha, TargetSpec};
use lorakit::peft::{PeftAdapter, PeftConfig};

#[test]
fn list_is_exact_name_or_dotted_suffix() {
    let spec = TargetSpec::new(ModuleSelector::list(["q_proj", "mlp.up_proj"]));
    assert!(spec.is_target("q_proj"));
    assert!(spec.is_target("model.layers.3.self_attn.q_proj"));
    assert!(spec.is_target("model.layers.3.mlp.up_proj"));
    assert!(!spec.is_target("model.layers.3.self_attn.xq_proj")); // suffix without the dot
    assert!(!spec.is_target("model.layers.3.self_attn.q_proj.inner"));
    assert!(!spec.is_target("model.layers.3.up_proj"));
}

#[test]
fn regex_must_match_the_whole_path() {
    let spec =
        TargetSpec::new(ModuleSelector::regex(r".*\.layers\.[01]\.self_attn\.(q|v)_proj").unwrap());
    assert!(spec.is_target("model.layers.0.self_attn.q_proj"));
    assert!(spec.is_target("model.layers.1.self_attn.v_proj"));
    assert!(!spec.is_target("model.layers.2.self_attn.q_proj"));
    assert!(!spec.is_target("model.layers.0.self_attn.q_proj.base")); // full match only
    assert!(!spec.is_target("layers.0.self_attn.q_proj")); // `.*\.` needs a leading part
    let partial = TargetSpec::new(ModuleSelector::regex("q_proj").unwrap());
    assert!(!partial.is_target("model.q_proj"));
    assert!(ModuleSelector::regex("(unclosed").is_err());
}

#[test]
fn exclusions_come_first_in_both_forms() {
    let base = TargetSpec::new(ModuleSelector::list(["q_proj", "k_proj"]));
    let by_list = base.clone().exclude(ModuleSelector::list([
        "layers.1.self_attn.q_proj",
        "k_proj",
    ]));
    assert!(by_list.is_target("model.layers.0.self_attn.q_proj"));
    assert!(!by_list.is_target("model.layers.1.self_attn.q_proj"));
    assert!(!by_list.is_target("model.layers.0.self_attn.k_proj"));
    let by_regex = base.exclude(ModuleSelector::regex(r".*\.1\..*").unwrap());
    assert!(!by_regex.is_target("model.layers.1.self_attn.q_proj"));
    assert!(by_regex.is_target("model.layers.0.self_attn.k_proj"));
}

#[test]
fn all_linear_skips_the_output_head() {
    let spec = TargetSpec::new(ModuleSelector::AllLinear);
    assert!(spec.is_target("model.layers.0.mlp.down_proj"));
    assert!(!spec.is_target("lm_head"));
    let custom = TargetSpec::new(ModuleSelector::AllLinear).output_head("classifier");
    assert!(custom.is_target("lm_head") && !custom.is_target("model.classifier"));
    let json = r#"{"peft_type": "LORA", "target_modules": "all-linear"}"#;
    let c = PeftConfig::from_json_str(json, "inline").unwrap();
    assert!(c.targets.is_target("x.q_proj") && !c.targets.is_target("lm_head"));
}

#[test]
fn patterns_first_matching_key_wins() {
    // PEFT: re.match(rf"(.*\.)?({key})$", name) over the keys in order.
    let p = Pattern::new(
        [
            ("fc1".to_string(), 2usize),
            ("blocks.1.fc2".to_string(), 3),
            ("fc.".to_string(), 5),
        ],
        "rank_pattern",
    )
    .unwrap();
    assert_eq!(p.lookup("blocks.0.fc1"), Some(2));
    assert_eq!(p.lookup("fc1"), Some(2));
    assert_eq!(p.lookup("blocks.1.fc2"), Some(3));
    assert_eq!(p.lookup("blocks.0.fc2"), Some(5)); // `fc.` is a regex
    assert_eq!(p.lookup("blocks.0.xfc1"), None); // must start after a dot
    assert_eq!(p.lookup("blocks.0.fc1.inner"), None); // must end the name
    let mut ra = RankAlpha::new(8, 16.0);
    ra.rank_pattern = p;
    ra.alpha_pattern = Pattern::new([("0.fc2".to_string(), 1.5)], "alpha_pattern").unwrap();
    let s = ra.for_module("blocks.0.fc2");
    assert_eq!((s.r, s.alpha), (5, 1.5));
    let s = ra.for_module("head");
    assert_eq!((s.r, s.alpha), (8, 16.0));
}

/// The modules real PEFT adapted (keys in the file) and their ranks are the ones the plan
/// selects on the fixture's module list.
#[test]
fn fixture_targets_agree_with_peft() {
    for case in [
        "lora_mlp",
        "rslora_patterns",
        "llama_names",
        "dora",
        "vera",
        "adalora",
    ] {
        let adapter = PeftAdapter::load(fixture(case).join("adapter"), &Device::Cpu).unwrap();
        let c = adapter.config();
        let mine: Vec<String> = layer_specs(case)
            .into_iter()
            .map(|l| l.0)
            .filter(|p| c.targets.is_target(p))
            .collect();
        let mut mine_sorted = mine.clone();
        mine_sorted.sort();
        assert_eq!(mine_sorted, adapter.module_paths(), "{case}");
        if c.peft_type == lorakit::peft::PeftType::Lora {
            for p in &mine {
                let a = adapter
                    .tensor(&format!("base_model.model.{p}.lora_A.weight"))
                    .unwrap();
                assert_eq!(a.dims()[0], c.ranks.for_module(p).r, "{case}: rank of {p}");
            }
        }
    }
}
