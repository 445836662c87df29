"""Test-wide settings: CPU threads, the Triton interpreter when there is no GPU, quiet Megatron warnings."""

import os
import warnings

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ----------------------------------------------------------------------------- the slow marker
#
# `pytest -m "not slow"` is the inner loop (under 3 minutes on 2 cores); CI runs everything. Slow: real
# SLURM jobs, vLLM environments, chaos and the improvement study, and multi-process runs beyond the one
# smoke case each module keeps. An entry is a file, or file::test (every parametrization of it); tests that
# share an expensive module fixture are listed together, so that the fixture is not built at all.
SLOW = (
    # real SLURM jobs
    "test_slurm.py::test_sbatch_spin_70b_script_runs_a_tiny_iteration",
    "test_slurm.py::test_requeue_mid_training_resumes_to_identical_weights",
    "test_slurm.py::test_job_steps_get_cpus_per_task_mpi_and_the_launch_environment",
    "test_slurm.py::test_a_failed_doctor_stops_the_job_before_its_step",
    "test_job_exit.py::test_no_rank_leaves_a_preempted_job_before_rank_0_has_published",
    "test_doctor.py::test_sbatch_job_whose_doctor_fails_ends_fast_with_the_table",
    "test_engine_launch.py::test_worker_runs_as_its_own_srun_step_inside_the_job",
    "test_engine_launch.py::test_two_instances_run_as_two_overlapping_srun_steps_of_the_job",
    # vLLM environments
    "test_vllm_engine.py::test_greedy_parity_vllm_transformers_megatron_with_eos",
    "test_vllm_engine.py::test_engine_logprobs_are_raw_model_logprobs",
    "test_vllm_engine.py::test_spin_iteration_with_vllm_resumes_after_worker_kill_one_engine_start_and_agreement",
    "test_vllm_engine.py::test_agreement_check_fails_when_the_engine_ran_the_previous_iterate",
    "test_vllm_engine.py::test_engine_check_vllm_in_the_real_environment",
    "test_vllm_engine.py::test_two_instances_give_the_same_samples_as_one_for_every_prompt",
    "test_vllm_engine.py::test_a_killed_instance_leaves_only_its_shards_and_the_rerun_serves_just_those",
    "test_eval_harness_vllm.py::test_harness_vllm_backend_matches_transformers_on_the_tp2_export",
    # chaos, the demo and the improvement study
    "test_chaos.py",
    "test_demo.py",
    "test_selfimprove_improvement.py",
    "test_timeline.py::test_timeline_lists_every_stage_with_its_loads",
    "test_timeline.py::test_resumed_stages_record_zero_seconds",
    "test_timeline.py::test_report_prints_the_table_and_writes_the_gantt",
    "test_timeline.py::test_demo_results_show_the_timeline",
    # multi-process runs beyond each module's smoke case
    "test_async_checkpoint.py::test_async_save_matches_sync_and_skips_the_last_step",
    "test_async_checkpoint.py::test_training_continues_while_the_save_is_written",
    "test_async_checkpoint.py::test_sigusr1_with_a_save_in_flight_publishes_it_then_stops",
    "test_async_checkpoint.py::test_save_interval_minutes_saves_after_the_same_steps_on_every_rank",
    "test_async_checkpoint.py::test_a_rerun_of_a_finished_run_trains_nothing",
    "test_async_checkpoint.py::test_sigkill_during_an_in_flight_save_resumes_from_the_last_published_one_bitwise",
    "test_async_checkpoint.py::test_sigkill_between_the_last_step_and_the_model_save_retrains_to_the_same_weights",
    "test_preemption.py::test_reference_pass_stops_after_the_current_shard_and_resumes",
    "test_preemption.py::test_generation_stops_after_the_current_round_and_resumes",
    "test_preemption.py::test_trainer_saves_at_the_signalled_step_and_resumes_bitwise",
    "test_preemption.py::test_cli_exits_for_requeue_on_sigusr1_and_the_rerun_matches",
    "test_trainer.py::test_tp2_pp2_matches_tp1",
    "test_trainer.py::test_killed_run_resumes_to_identicalcheckpoint_weights",
    "test_trainer.py::test_init_from_hf_run_still_loads_its_own_iterates",
    "test_virtual_pipeline.py",
    "test_hf_convert.py::test_logits_match_hf",
    "test_hf_convert.py::test_logits_match_hf_tp2_pp2",
    "test_hf_convert.py::test_checkpoint_saved_at_2x2_loads_at_other_layouts",
    "test_hf_convert.py::test_export_reproduces_hf_state_dict_bitwise",
    "test_hf_convert.py::test_export_loads_in_transformers",
    "test_hf_convert.py::test_cli_round_trip_mistral_bf16",
    "test_model_checkpoint.py::test_load_refuses_other_rope_or_norm_settings",
    "test_model_checkpoint.py::test_saved_iterate_takes_fp8_params_from_the_optimizers_main_params",
    "test_model_checkpoint.py::test_dp2_fully_parallel_save_loads_back_bitwise_at_dp1",
    "test_dali_loader.py::test_spin_loss_and_weights_are_bitwise_equal_between_loaders_at_dp2",
    "test_dali_loader.py::test_a_run_resumes_across_loaders_to_the_same_weights",
    "test_throughput_settings.py::test_overlapped_grad_reduce_and_param_gather_match_no_overlap",
    "test_cli_errors.py::test_debug_shows_the_traceback",
    "test_generation.py::test_greedy_matches_transformers_tp1_and_tp2",
    "test_generation.py::test_seeded_sampling_is_reproducible_and_batch_independent",
    "test_generation.py::test_stage_data_parallel_matches_single_process",
    "test_fused_linear_logprobs.py::test_tp2_matches_fp64_and_tp1_step",
    "test_fused_linear_logprobs.py::test_pp2_step_equals_materialised_tp1",
    "test_cpu_numerics.py::test_pinned_training_steps_do_not_depend_on_avx512",
    "test_engine_queue.py::test_conversion_spread_over_two_ranks_is_byte_identical_to_one_rank",
    "test_gpu_acceptance.py::test_spin_steps_on_cpu",
    "test_gpu_acceptance.py::test_runner_on_cpu_records_every_gpu_check_as_skipped",
    "test_gpu_acceptance.py::test_engine_comparison_on_cpu",
    "test_hf_config.py::test_rope_scaled_logits_match_hf",
    "test_hf_config.py::test_plain_rope_would_be_wrong",
    "test_hf_config.py::test_rope_scaled_export_round_trip",
    "test_optimizer.py::test_rmsprop_dp2_matches_torch",
    "test_optimizer.py::test_square_avg_checkpoint_round_trip",
    "test_optimizer.py::test_dp1_distributed_and_reshard_from_dp2",
    "test_optimizer.py::test_adamw_matches_torch",
    "test_optimizer.py::test_bf16_params_keep_fp32_main_params",
    "test_job_exit.py::test_train_checkpoint_common_state_is_the_same_on_every_rank",
    "test_packed_training.py::test_packed_logprobs_match_padded",
    "test_packed_training.py::test_packed_train_step_matches_padded",
    "test_selfimprove.py::test_restem_bookkeeping_filter_and_resume",
    "test_selfimprove.py::test_rpo_step0_loss_is_ln2_plus_nll",
    "test_prepared_cache.py::test_two_ranks_tokenise_once",
    "test_sequence_logprobs.py::test_tp2_matches_tp1_reference_and_megatron",
    "test_plan.py::test_memory_model_matches_measured",
    "test_slurm_env.py::test_srun_style_world_meets_and_matches_the_plan",
    "test_timeline.py::test_restem_loop_records_its_stages",
    "test_swiglu.py::test_mlp_bitwise_megatron_mlp_tp2",
    "test_throughput_settings.py::test_loaded_model_skips_init_and_equals_checkpoint_bitwise",
    "test_throughput_settings.py::test_pad_to_longest_matches_pad_to_seq_length",
    "test_bad_input.py::test_saves_remove_a_killed_saves_leftovers",
    "test_bad_input.py::test_save_records_every_weights_file_with_its_size_and_sha256",
    "test_bad_input.py::test_damaged_mcore_checkpoints_are_named_file_by_file",
    "test_bad_input.py::test_truncated_distcp_through_the_console_script_is_one_line_and_exit_1",
    "test_bad_input.py::test_damaged_safetensors_are_refused_in_one_line",
)


def pytest_collection_modifyitems(config, items):
    """Mark the SLOW tests; an entry that names a collected file but none of its tests is an error (a renamed test)."""
    import pytest

    matched, files = set(), set()
    for item in items:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        name = item.nodeid.split("::")[1].split("[")[0] if "::" in item.nodeid else ""
        files.add(path)
        for entry in (path, f"{path}::{name}"):
            if entry in SLOW:
                item.add_marker(pytest.mark.slow)
                matched.add(entry)
    stale = [e for e in SLOW if e.split("::")[0] in files and e not in matched]
    if stale and not any("::" in arg for arg in config.args):  # a whole file was collected, so the test is gone
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {', '.join(stale)}")
