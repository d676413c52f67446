"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere; the `slow` and `integration` markers."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def parity_dir() -> pathlib.Path:
  """The parity fixture directory: $MMADA_PARITY_DIR, or the copy under tests/fixtures/parity."""
  return pathlib.Path(os.environ.get("MMADA_PARITY_DIR") or FIXTURES / "parity")


@pytest.fixture(scope="session")
def parity_path() -> pathlib.Path:
  return parity_dir()


# ----------------------------------------------------------------------------------------------------------------------
# Markers (registered in pyproject.toml). `python -m pytest -q tests` runs everything; `-m "not slow"` is the quick
# loop. An entry is a test file, `file::test` (every parametrisation) or `file::test[id]`.

# Over ~5 s each on a loaded 2-core CPU host (pytest --durations, whole suite).
SLOW = {
  "test_faults_preemption.py",
  "test_presets_equivalence.py",
  "test_train_loop.py",
  "test_aot.py::test_8b_does_not_fit_on_v5e_4",
  "test_aot.py::test_estimate_extrapolates_the_cost_model_over_layers",
  "test_aot.py::test_multislice_dp_fsdp_puts_data_over_dcn",
  "test_aot.py::test_tiny_fits_on_v5e_4",
  "test_aot.py::test_tiny_unigrpo_step_fits_on_v5e_4",
  "test_backbone_parity.py::test_logits_and_hidden_states",
  "test_bench.py::test_compute_params_cast_and_stack_once_is_exact",
  "test_bench.py::test_generate_variants_and_token_match",
  "test_bench.py::test_stack_kernels_keeps_grouped_query_kernels",
  "test_bench.py::test_train_report_fields",
  "test_bench.py::test_workload_report",
  "test_corruption.py::test_masks_depend_only_on_example_id",
  "test_eval.py::test_eval_all_tasks_writes_json_markdown_and_grid",
  "test_eval.py::test_eval_plain_text_task_only",
  "test_eval.py::test_periodic_sampler_matches_eval_cli_and_writes_files",
  "test_eval.py::test_showcase_answers_and_frames_drawings_by_verdict",
  "test_faults_checkpoint.py::test_training_resumes_from_the_fallback_and_rewrites_the_bad_step",
  "test_faults_numerics.py::test_loop_counts_skips_logs_spikes_and_stops_after_consecutive_nonfinite",
  "test_faults_numerics.py::test_nonfinite_policy_step_keeps_the_state",
  "test_faults_numerics.py::test_nonfinite_train_step_keeps_the_state",
  "test_losses.py::test_attention_conventions",
  "test_losses.py::test_head_has_no_full_logits_and_is_exact",
  "test_losses.py::test_loss_parity",
  "test_losses.py::test_shorter_lm_rows_get_their_own_forward_pass",
  "test_magvit.py::test_other_architecture_against_numpy_reference",
  "test_model.py::test_bf16_compute_and_params",
  "test_model.py::test_cached_modes_equal_the_full_forward",
  "test_model.py::test_cached_modes_in_bf16",
  "test_model.py::test_cached_modes_reproduce_the_parity_fixture",
  "test_model.py::test_library_attention_matches_einsum",
  "test_model.py::test_remat_policies_same_values_and_grads",
  "test_model.py::test_window_keeps_stale_keys_outside_itself",
  "test_multihost.py::test_two_processes_train_checkpoint_and_match_one_process",
  "test_parity_other_sets.py::test_parity_suite_on_other_shapes",
  "test_prepare.py::test_sigkill_mid_run_then_rerun_gives_the_same_bytes",
  "test_rl_loop.py::test_oversample_by_accuracy",
  "test_rl_loop.py::test_oversampled_step_trains_on_groups_with_signal",
  "test_rl_loop.py::test_sampled_evaluation",
  "test_rl_loop.py::test_t2i_task",
  "test_rl_loop.py::test_two_steps_checkpoint_resume_and_init_from",
  "test_rl_objective.py::test_gradient_at_theta_old_is_the_policy_gradient",
  "test_rl_objective.py::test_logp_equals_naive_full_logits",
  "test_rl_step.py::test_micro_batches_and_sharding_change_nothing",
  "test_rl_step.py::test_sharded_step_identity_donation_and_no_recompile",
  "test_sample_cli.py::test_stream_text_equals_generate",
  "test_sampling_image.py::test_other_fixture_sets",
  "test_sampling_image.py::test_sample_temperature_scales_the_draw_noise",
  "test_sampling_text.py::test_dual_cache",
  "test_sampling_text.py::test_left_padded_row_equals_prompt_alone",
  "test_sampling_text.py::test_other_fixture_sets",
  "test_sampling_text.py::test_threshold_decoding",
  "test_sharding.py::test_sharded_forward_matches_unsharded",
  "test_train_magvit.py::test_interrupted_run_resumes_to_the_same_state",
  "test_train_magvit.py::test_loss_falls_and_checkpoints_export",
  "test_train_step.py::test_accumulation_equals_full_batch",
  "test_train_step.py::test_accumulation_with_the_mmada_objective",
  "test_train_step.py::test_gradient_accumulators_are_constrained_to_the_parameter_shardings",
  "test_train_step.py::test_same_seed_same_metrics_and_loss_decreases",
  "test_train_step.py::test_state_is_created_sharded",
}

# Spawn subprocesses, run a whole train / RL / MAGVIT loop, or drive a command end to end.
INTEGRATION = {
  "test_faults_preemption.py",
  "test_train_loop.py",
  "test_aot.py::test_8b_does_not_fit_on_v5e_4",
  "test_aot.py::test_estimate_extrapolates_the_cost_model_over_layers",
  "test_aot.py::test_multislice_dp_fsdp_puts_data_over_dcn",
  "test_aot.py::test_tiny_fits_on_v5e_4",
  "test_aot.py::test_tiny_unigrpo_step_fits_on_v5e_4",
  "test_bench.py::test_bad_input_errors",
  "test_bench.py::test_generate_variants_and_token_match",
  "test_bench.py::test_main_prints_json",
  "test_bench.py::test_main_prints_summary",
  "test_bench.py::test_official_side_by_side_tiny",
  "test_bench.py::test_train_report_fields",
  "test_bench.py::test_workload_report",
  "test_convert.py::test_cli_convert_both_ways",
  "test_convert.py::test_cli_convert_magvit_both_ways",
  "test_convert.py::test_cli_info",
  "test_eval.py::test_eval_all_tasks_writes_json_markdown_and_grid",
  "test_eval.py::test_eval_plain_text_task_only",
  "test_eval.py::test_periodic_sampler_matches_eval_cli_and_writes_files",
  "test_faults_checkpoint.py::test_training_resumes_from_the_fallback_and_rewrites_the_bad_step",
  "test_faults_numerics.py::test_loop_counts_skips_logs_spikes_and_stops_after_consecutive_nonfinite",
  "test_launch.py::test_gpu_slurm_batch_script",
  "test_launch.py::test_help",
  "test_multihost.py::test_two_processes_train_checkpoint_and_match_one_process",
  "test_parity_other_sets.py::test_empty_parity_dir_fails",
  "test_parity_other_sets.py::test_parity_suite_on_other_shapes",
  "test_prepare.py::test_command_line_end_to_end",
  "test_prepare.py::test_sigkill_mid_run_then_rerun_gives_the_same_bytes",
  "test_rl_loop.py::test_oversample_by_accuracy",
  "test_rl_loop.py::test_oversampled_step_trains_on_groups_with_signal",
  "test_rl_loop.py::test_sampled_evaluation",
  "test_rl_loop.py::test_t2i_task",
  "test_rl_loop.py::test_two_steps_checkpoint_resume_and_init_from",
  "test_sample_cli.py::test_errors_name_the_problem",
  "test_sample_cli.py::test_export_writes_the_runs_parameters",
  "test_sample_cli.py::test_mmu_answers_questions_about_an_image_file",
  "test_sample_cli.py::test_t2i_writes_pngs_and_never_overwrites",
  "test_sample_cli.py::test_text_streams_an_answer",
  "test_sample_cli.py::test_workdir_latest_step_equals_the_same_params",
  "test_sampling_image.py::test_empty_parity_dir_fails",
  "test_sampling_image.py::test_other_fixture_sets",
  "test_sampling_text.py::test_bench_command",
  "test_sampling_text.py::test_empty_parity_dir_fails",
  "test_sampling_text.py::test_other_fixture_sets",
  "test_tokenizer.py::test_training_is_deterministic_across_processes",
  "test_train_magvit.py::test_interrupted_run_resumes_to_the_same_state",
  "test_train_magvit.py::test_loss_falls_and_checkpoints_export",
}

_MARKERS = {"slow": SLOW, "integration": INTEGRATION}
_STALE = pytest.StashKey[list]()  # entries a whole-directory run did not use


def _keys(item: pytest.Item) -> tuple[str, ...]:
  """The list entries that can name `item`: its file, `file::test` and `file::test[id]`."""
  name = getattr(item, "originalname", None) or item.name
  return item.path.name, f"{item.path.name}::{name}", f"{item.path.name}::{item.name}"


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  used = set()
  for item in items:
    keys = _keys(item)
    for marker, entries in _MARKERS.items():
      hits = entries.intersection(keys)
      if hits:
        item.add_marker(marker)
        used.update((marker, e) for e in hits)
  # A whole-directory run should use every entry; one that names nothing is a renamed or removed test.
  if all(os.path.isdir(str(a).split("::")[0]) for a in config.args):
    config.stash[_STALE] = sorted(f"{m}: {e}" for m, entries in _MARKERS.items() for e in entries if (m, e) not in used)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
  stale = config.stash.get(_STALE, [])
  if stale:
    terminalreporter.write_line("tests/conftest.py marker entries that name no collected test (renamed or removed?): "
                                + ", ".join(stale), yellow=True)
