"""The one base configuration; files in configs/ start from it and override."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"

    # ---- data (SPEC.md sections 2-3)
    c.dataset = "synthetic"        # synthetic | d3 | tfds
    c.dataset_dir = ""             # D3-format folder (dataset=d3) or TFDS data_dir (dataset=tfds)
    c.data = ml_collections.ConfigDict()
    c.data.category = ""           # '' = derived from the folder name
    c.data.template = "latentr3"   # latentr3 (D3 template) | bigrec (Alpaca template)
    c.data.cutoff = 512            # prompt tokens kept (left truncation)
    c.data.buckets = (64, 128, 256, 512)   # prompt-length buckets (static shapes)
    c.data.max_target_len = 32
    c.data.target_buckets = (16, 32)       # target-length buckets (static shapes)
    c.data.tfds_name = ""          # dataset=tfds: which dataset under dataset_dir ('' = the only one)
    c.data.skip_invalid = False
    c.data.max_train_rows = -1     # -1 = all
    c.data.max_eval_rows = -1
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_items = 320
    c.data.synthetic.num_users = 700   # ~3.1k train / 387 valid / 388 test rows
    c.data.synthetic.seed = 0

    # ---- tokenizer: a local HF directory, or trained in-process (byte-level BPE)
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""          # '' = the model's hf_path, else train one
    c.tokenizer.vocab_size = 8000          # at most; a small corpus gives fewer
    c.tokenizer.split = "qwen"             # trained BPE pre-tokeniser: qwen | gpt2
    c.tokenizer.min_frequency = 2

    # ---- model (SPEC.md section 4)
    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""           # local HF checkpoint dir; '' = from scratch with the shape below
    c.model.model_type = "qwen2"
    c.model.hidden_size = 256
    c.model.intermediate_size = 1024
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.rope_theta = 1000000.0
    c.model.tie_word_embeddings = True
    c.model.num_thoughts = 1       # 0 = plain BIGRec/D3 SFT baseline
    c.model.latent_mode = "ratt"   # ratt | hidden (ablation: raw hidden state as latent)
    c.model.dtype = "float32"      # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.remat = False          # recompute each layer's activations in the backward pass
    # auto: run the layers under lax.scan when there are more than 8 (one layer compiled;
    # deep models, TPUs), unrolled otherwise (faster for shallow models: no stacked
    # residual copies); or true / false
    c.model.scan_layers = "auto"

    # ---- device mesh (-1 = all remaining devices)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # ---- multi-host (jax.distributed); empty = single process or auto-detected on TPU
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    # ---- stage 1: SFT (SPEC.md section 5)
    c.sft = ml_collections.ConfigDict()
    c.sft.init_from = ""            # run directory whose best weights start this run ('' = model.*)
    c.sft.learning_rate = 3e-4
    c.sft.warmup_steps = 20
    c.sft.batch_size = 128          # global batch (sequences)
    c.sft.micro_batch_size = 0      # 0 = no gradient accumulation
    c.sft.epochs = 3
    c.sft.max_steps = -1
    c.sft.patience = 1
    c.sft.weight_decay = 0.0
    c.sft.grad_clip = 1.0
    c.sft.log_every = 10
    c.sft.checkpoint_every = 200
    c.sft.keep_checkpoints = 2
    c.sft.max_bad_steps = 10        # consecutive non-finite steps before stopping
    c.sft.eval_batch_size = 0       # validation batch; 0 = the micro-batch size

    # ---- stage 2: LR-GRPO (SPEC.md section 6)
    c.grpo = ml_collections.ConfigDict()
    c.grpo.init_from = ""           # SFT run directory
    c.grpo.group_size = 8
    c.grpo.sigma = 1.5
    c.grpo.learning_rate = 5e-5
    c.grpo.warmup_steps = 200
    c.grpo.prompts_per_batch = 32   # global batch = prompts_per_batch * group_size sequences
    c.grpo.micro_batch_size = 0     # prompts per micro-batch; 0 = no accumulation
    c.grpo.epochs = 1
    c.grpo.max_steps = -1
    c.grpo.advantage = "batch"      # batch | group | grpo (per-group mean/std)
    c.grpo.estimator = "ppo"        # ppo (release: token log-prob ratio) | reinforce (Gaussian score) | pathwise
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.28
    c.grpo.iterations = 1           # PPO iterations (mu) per batch
    c.grpo.kl_beta = 0.0
    c.grpo.train_llm = False
    c.grpo.grad_clip = 1.0
    c.grpo.log_every = 10
    c.grpo.checkpoint_every = 200
    c.grpo.keep_checkpoints = 2
    c.grpo.max_bad_steps = 10
    c.grpo.evaluate = True          # HR/NDCG on the valid split after training

    # ---- `latentr3 run` (the whole recipe)
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.base_epochs = 0      # >0: a shared N=0 SFT stage of this many epochs that both
                                    # SFT variants start from (sft.init_from); 0 = none

    # ---- evaluation (SPEC.md section 7)
    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""          # run directory to evaluate
    c.eval.split = "test"
    c.eval.mode = "constrained"     # constrained (D3 trie beam search) | bigrec (grounding)
    c.eval.num_beams = 10
    c.eval.length_penalty = 1.0
    c.eval.batch_size = 16
    c.eval.max_users = -1
    c.eval.ks = (1, 3, 5, 10, 20)
    c.eval.output_dir = ""          # '' = <checkpoint>/eval_<split>_<mode> (or <workdir>/...)
    c.eval.data_from_run = True     # dataset/data settings from the run's config.json
    c.eval.grounding_beams = 4      # bigrec: beams of the free generation
    c.eval.max_new_tokens = 32      # bigrec: longest generated title (tokens, EOS included)
    c.eval.resume = True            # continue from an existing predictions.jsonl
    c.eval.progress = True          # tqdm progress bar
    return c
