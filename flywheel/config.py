"""One settings object for the CLI and every deployment.

Sources, highest priority first: explicit keyword arguments, the settings a parent process handed
down (``FLYWHEEL_SETTINGS_JSON``), ``FLYWHEEL_*`` environment variables (nested with ``__``, e.g.
``FLYWHEEL_SERVING__ENGINE=hf``), the YAML file named by ``--config`` or ``FLYWHEEL_CONFIG``, then the
embedded defaults below (one box, local Ray, local registry, demo model).

Secrets (`admin_token`, `feedback.sasl_password`) are `SecretStr`: masked in every dump, log and
status output, and handed to other processes only through their environment, never a file or a
deployment's init arguments.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import fsspec
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from flywheel.auth import is_loopback, valid_rate
from flywheel.tasks import DEMO_TASK, BaseVersionName, TaskName, TaskSpec

DEMO_MODEL = "demo"
LOCAL_PROTOCOLS = ("file", "local")  # fsspec's names for this machine's disk
DEMO_CONTEXT = 512  # tokens of context the demo base is built with (known before it is built)
SHARED_SETTINGS_ENV = "FLYWHEEL_SETTINGS_JSON"
ADMIN_TOKEN_ENV, SASL_PASSWORD_ENV = "FLYWHEEL_ADMIN_TOKEN", "FLYWHEEL_FEEDBACK__SASL_PASSWORD"  # where secrets travel


class ModelSettings(BaseModel):
    """The base model every adapter is trained against and served on."""

    base: str = Field(
        DEMO_MODEL,
        description="`demo` (the tiny model `flywheel bootstrap` builds locally), a local HF model "
        "directory, or a hub id such as deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B.",
    )
    task: TaskName | None = Field(
        None, description="The default task (a request that names none gets it); None: the first of `tasks`."
    )
    quantized_base: BaseVersionName | None = Field(
        None,
        description="Registry base version from `flywheel quantize` (e.g. demo-gptq-w4g128-v1) that serving "
        "and the gate run on; None serves the unquantized base. Adapters are trained against `base`.",
    )


_CREDENTIAL_NAME = re.compile(r"secret|passw|token|credential|access_key|(^|_)key$", re.IGNORECASE)


def refuse_credentials(options: dict[str, Any], setting: str) -> dict[str, Any]:
    """Storage options travel with every job and replica's settings: a credential among them would be on show."""
    def named(value: Any, path: str) -> list[str]:
        if not isinstance(value, dict):
            return []
        found = [f"{path}{key}" for key in value if _CREDENTIAL_NAME.search(str(key))]
        return found + [hit for key, inner in value.items() for hit in named(inner, f"{path}{key}.")]

    if found := named(options, f"{setting}."):
        raise ValueError(f"{', '.join(found)} looks like a credential: give it to the process that uses it in "
                         "its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_"
                         "CREDENTIALS…), never in the settings, which travel with every job")
    return options


class RegistrySettings(BaseModel):
    uri: str = Field("", description="Local path or fsspec URL (s3:// with the `s3` extra, gs:// with `gcs`). "
                     "Empty: `<home>/registry`.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `uri`, e.g. {endpoint_url: http://minio:9000} for an "
        "S3-compatible store. Credentials come from the environment (AWS_ACCESS_KEY_ID…), not from here.",
    )

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return refuse_credentials(options, "registry.storage_options")


class VLLMSettings(BaseModel):
    """Engine arguments passed to vLLM's AsyncLLM."""

    dtype: str = "auto"
    max_model_len: int | None = Field(
        None, ge=16, description="Context (prompt + answer) in tokens; None: the base model's own "
        "(max_position_embeddings). Size the KV cache for it on GPUs (R1-Distill's own is 131072).",
    )
    max_loras: int = Field(3, ge=1, description="Distinct adapters one batch can run (GPU slots); more tasks "
                           "than this still serve, taking turns.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters each replica keeps loaded; past it the least recently used idle one is "
        "removed and loaded again on its next request (counted in /metrics). None: every task's champion, one "
        "incoming and one draining version, and `serving.max_pinned_adapters`.")
    max_lora_rank: int = Field(32, description="Largest LoRA rank an adapter may have (vLLM: 8, 16, 32, 64…).")
    max_num_seqs: int = 64
    gpu_memory_utilization: float = 0.85
    quantization: str | None = None
    cpu_kvcache_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE for the CPU build.")
    enforce_eager: bool = True


class AutoscalingSettings(BaseModel):
    """Serve's autoscaling of the LLM deployment: replicas follow the requests in flight on each."""

    min_replicas: int = Field(1, ge=1, description="Never fewer (each holds every task's champion).")
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(24, gt=0, description="Requests in flight per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0, description="A new replica loads the base and every champion: "
                                     "keep it a while.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ServingSettings(BaseModel):
    engine: Literal["vllm", "hf"] = Field(
        "vllm", description="`vllm` (AsyncLLM) or `hf` (transformers+PEFT reference engine)."
    )
    app_name: str = Field(
        "flywheel", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="The Serve application's name: a retrain on the same Ray cluster finds the serving replicas "
        "by it, to judge its candidate on them.")
    host: str = "127.0.0.1"
    port: int = 8000
    ingress: Literal["haproxy", "serve"] = Field(
        "haproxy", description="What listens on `port` in a Ray flywheel starts: `haproxy`, Ray Serve's HAProxy "
        "mode (HAProxy, shipped with `ray[serve]`, forwards HTTP straight to the gateway replicas' own ports: about "
        "7 ms less per request on a 2-core box), or `serve`, Serve's own proxy (a Ray actor per node, one more "
        "hop). A Ray-wide choice: a cluster's own environment decides for it (`RAY_SERVE_ENABLE_HA_PROXY=1`).")
    topology: Literal["auto", "fused", "split"] = Field(
        "auto", description="How the HTTP gateway meets the engine; `auto`: `fused` for one fixed LLM replica or "
        "behind HAProxy, `split` for several or autoscaling behind Serve's proxy. `fused`: every LLM replica is also "
        "the HTTP ingress, so a request reaches its engine with no hop between replicas (the lowest latency); with "
        "several behind HAProxy, HAProxy asks a TaskRouter which replica answers each request, so a task's requests "
        "go to the replicas that hold its adapter (behind Serve's proxy they are spread by load alone). `split`: a "
        "CPU-only gateway deployment in front of the LLM replicas, scaled apart from them; Serve's multiplexing "
        "sends a task's requests to replicas that hold its adapter.")
    replicas: int = Field(1, ge=1, description="LLM replicas, when `autoscaling` is not set.")

    autoscaling: AutoscalingSettings | None = Field(
        None, description="Let Serve scale the LLM replicas between min and max on requests in flight (new "
        "replicas converge on every task's champion by themselves); None: a fixed `replicas`.")
    replica_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per LLM replica.")
    replica_gpus: float = Field(0.0, ge=0, description="Ray GPUs per LLM replica (1 for vLLM on CUDA).")
    max_prompt_chars: int = Field(4000, ge=1)
    max_tokens_limit: int = Field(
        4096, ge=1, description="Largest `max_tokens` a request may ask for. A request that asks for none gets its "
        "task's `max_new_tokens` (capped by this and by the model's context)."
    )
    alias: str = Field("champion", description="Registry alias this app serves.")
    poll_interval_s: float = Field(0.2, gt=0, description="How often replicas re-read the alias.")
    probe_prompt: str = "ping"
    drain_timeout_s: float = Field(30.0, gt=0, description="Wait this long for old-version requests.")
    request_log: Literal["file", "stderr", "off"] = Field(
        "file", description="Where each replica's one line per request (/predict, /v1, /feedback) goes. `file`: "
        "`<home>/logs/requests-<host>-<pid>.log` (rotated at 64 MiB, 3 kept), written by a thread of its own, off "
        "the request path. `stderr`: beside the replica's other logs, which Ray forwards to the driver through one "
        "log monitor and the GCS: a cost that grows with load. `off`: none (the metrics still count requests).")
    max_pinned_adapters: int = Field(
        2, ge=1, description="Versions asked for by name (`task@version`) each replica keeps loaded beside the "
        "champions; the least recently used idle one is unloaded beyond this.")

    @property
    def fused(self) -> bool:
        """Whether each LLM replica is its own HTTP ingress (see `topology`)."""
        if self.topology == "auto":
            return (self.autoscaling is None and self.replicas == 1) or self.ingress == "haproxy"
        return self.topology == "fused"


class AuthSettings(BaseModel):
    """Who may call the app: API keys (`flywheel keys create`), or nobody's on a loopback-only demo."""

    mode: Literal["auto", "keys", "open"] = Field(
        "auto", description="`keys`: every route but /healthz and /metrics needs `Authorization: Bearer <key>` "
        "with the route's scope (predict, feedback, admin). `open`: /predict, /v1 and /feedback need no key (their "
        "ratings count as anonymous and train nothing until reviewed); allowed only when serving listens on "
        "loopback. `auto`: `open` on loopback, `keys` anywhere else.")
    rate: str = Field("50/second", description="Requests per key (per client address for anonymous callers), in "
                      "`limits` notation (`100/minute`, `10/second`); a key's own `--rate` overrides it.")
    key_cache_s: float = Field(5.0, gt=0, description="How often replicas re-read the keys: a revoked key stops "
                               "working within this.")

    retract_rate: str = Field("30/minute", description="DELETE /feedback/{id} per caller (it may scan the curated "
                              "dataset), beside `rate`.")

    @field_validator("rate", "retract_rate")
    @classmethod
    def _a_rate(cls, rate: str) -> str:
        return valid_rate(rate)


class FeedbackSettings(BaseModel):
    """The feedback bus (Kafka, or an embedded durable local log) and the curator."""

    kafka_bootstrap: str | None = Field(
        None, description="host:port[,host:port]; None uses the embedded local log under <home>/feedback."
    )
    mask_at_source: bool = Field(
        True, description="Mask personal data in events at the gateway, before they reach the local log, the "
        "spool or Kafka (the curator masks again in any case).",
    )
    kafka_api_version: str | None = Field(
        None, description="Broker protocol version, e.g. `0.9` for the dev broker; None auto-detects."
    )
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    predictions_topic: str = "flywheel.predictions"
    feedback_topic: str = "flywheel.feedback"
    consumer_group: str = "flywheel-curator"
    curation: Literal["single", "partitioned"] = Field(
        "single", description="`single`: one curator, its join state in SQLite under <home>/feedback (one box). "
        "`partitioned` (Kafka only): any number of curators in `consumer_group`, each owning partition pairs, their "
        "join state rebuilt from the topics, no SQLite; see feedback/partitioned.py.")
    max_correction_chars: int = Field(4000, ge=1)
    max_comment_chars: int = Field(2000, ge=1)
    producer_buffer_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Most bytes the spool hands the producer at once (bounded memory)."
    )
    curator_batch_size: int = Field(200, ge=1, description="Curated rows per Parquet file at most.")
    curator_flush_s: float = Field(2.0, gt=0, description="Write a partial batch after this long.")
    log_retention_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Local log only: how much already-curated history each topic keeps on "
        "disk; older records give their space back (never one the curator has not read).")
    prediction_retention_s: float = Field(
        7 * 86400, gt=0, description="Predictions wait this long for their feedback, then leave the curator's state.")
    unmatched_retention_s: float = Field(
        86400, gt=0, description="Feedback waits this long for its prediction (normally seconds), then is dropped.")
    rater: Literal["asker", "any"] = Field(
        "asker", description="Who may rate an answer: `asker`, only the caller (key and vouched end user) that asked "
        "for it (request ids leak; strangers must not vote); `any`, any caller with the feedback scope.")
    max_unmatched: int = Field(
        100_000, ge=1, description="Most feedback waiting for a prediction; the oldest beyond it is dropped (a "
        "client can send feedback for any well-formed request id).")

    dataset_uri: str = Field(
        "", description="Where the curated dataset lives: a local path, or (with `curation: partitioned`) an fsspec "
        "URL such as s3://bucket/dataset (the `s3` extra), so curators on many machines share it with no "
        "ReadWriteMany volume. Empty: `<home>/feedback/dataset`.")
    dataset_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `dataset_uri`, e.g. {endpoint_url: http://minio:9000}. "
        "Credentials come from the environment (AWS_ACCESS_KEY_ID…), not from here.")

    @field_validator("dataset_storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        return refuse_credentials(options, "feedback.dataset_storage_options")

    @model_validator(mode="after")
    def _partitioned_needs_kafka(self) -> FeedbackSettings:
        if self.curation == "partitioned" and not self.kafka_bootstrap:
            raise ValueError("feedback.curation partitioned needs feedback.kafka_bootstrap (the local log has one "
                             "partition and one curator)")
        return self

    @model_validator(mode="after")
    def _object_store_needs_partitioned(self) -> FeedbackSettings:
        protocol = fsspec.utils.get_protocol(self.dataset_uri) if self.dataset_uri else "file"
        if protocol not in fsspec.available_protocols():
            raise ValueError(f"feedback.dataset_uri {self.dataset_uri!r}: fsspec knows no {protocol}:// store")
        if protocol not in LOCAL_PROTOCOLS and self.curation != "partitioned":
            raise ValueError(f"feedback.dataset_uri {self.dataset_uri!r} is on an object store: that needs "
                             "feedback.curation partitioned (the single curator keeps its dataset on a local disk)")
        return self


class GateSettings(BaseModel):
    """When a candidate adapter may replace the champion."""

    min_improvement: float = Field(0.05, description="Accuracy gain required on the newest feedback slice.")
    significance_alpha: float = Field(0.05, gt=0, lt=0.5, description="Level of the one-sided paired test that the "
                                      "candidate is better on the new slice (McNemar or permutation).")
    min_format_validity: float = Field(0.9, description="Share of answers with a closed <think> and an answer.")
    max_latency_ratio: float = Field(1.5, description="Candidate mean latency / champion's, at most.")
    min_parity: float = Field(0.75, description="Greedy agreement of serving engine and PEFT reference.")
    min_confirmed_score: float = Field(
        0.8, ge=0, le=1, description="Small-data policy: the candidate's mean task metric on the confirmed "
        "corrections' own prompts must reach this (it must honour what users agreed on).",
    )
    noninferiority_margin: float = Field(
        0.05, ge=0, lt=1, description="The most the candidate may be worse than the champion on the golden set "
        "(both policies) and, in the small-data policy, on the champion's answers users rated well, in the task's "
        "metric. Judged on the upper end of the drop's one-sided 1 - significance_alpha bound (exact for 0/1 "
        "metrics), not on the point estimate; a set too small for that bound to fit the margin even with nothing "
        "lost (59 examples at 0.05) is held to no loss instead (no example scored lower). Shown in the gate report.")
    parity_prompts: int = Field(8, ge=1, description="Prompts in the engine-parity probe.")
    serving_concurrency: int = Field(
        1, ge=1, description="Scoring requests the gate keeps in flight on the serving replicas: its bounded share "
        "of their concurrency, so users' requests keep theirs. Measured on 2 CPU cores under load: 1 keeps users' "
        "p99 at 1.5x steady while the gate scores (4: 3.6x, for an evaluation 1.7x faster); GPUs batch more "
        "cheaply and can take more.")

    @model_validator(mode="before")
    @classmethod
    def _golden_margin_renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "max_golden_regression" in data:
            raise ValueError("retrain.gate.max_golden_regression is gone: both policies judge the golden set by "
                             "retrain.gate.noninferiority_margin, on the drop's upper bound; set that instead")
        return data


class CanarySettings(BaseModel):
    """How a gate-passed candidate of a `rollout: canary` task earns its task's traffic on live ratings.

    Its share steps up on a schedule while the ratings show no harm; it is promoted once its mean rating is
    better than the champion's at `confidence` (an always-valid sequential test, so checking often is
    fine), rolled back once it is worse or breaks a guardrail, and held or rolled back at the deadline.
    """

    steps: list[float] = Field([0.05, 0.25, 0.5], min_length=1, description="Traffic shares, in order.")
    step_s: float = Field(600.0, gt=0, description="Least time at a share before the next.")
    min_ratings: int = Field(30, ge=2, description="Rated answers each arm needs before any verdict.")
    min_raters: int = Field(
        5, ge=2, description="Distinct raters each arm needs before any verdict: the test's units are raters (one "
        "mean each), and with 2 per arm a simulation gave 16 % false verdicts in A/A trials.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Of the sequential test, for promotion and rollback.")
    effect_sd: float = Field(
        0.5, gt=0, description="Rating difference (points on 1-5) the test is tuned to find: the spread of the "
        "mixture prior; smaller finds small differences sooner and large ones later.")
    deadline_s: float = Field(86400.0, gt=0, description="Time from the first step to a verdict.")
    on_deadline: Literal["hold", "rollback"] = Field("hold", description="No verdict by the deadline: keep the "
                                                                          "current share, or roll back.")
    max_error_rate_increase: float = Field(0.02, ge=0, description="Guardrail: canary failures minus champion's, "
                                                                   "as shares of their requests.")
    max_p99_ratio: float = Field(1.5, gt=0, description="Guardrail: canary p99 latency / champion's, judged once "
                                 "each arm has 100 timed requests on a replica (a p99 of fewer is one stall).")
    min_guardrail_requests: int = Field(20, ge=1, description="Requests per arm before the guardrails judge.")
    warmup_requests: int = Field(
        3, ge=0, description="A version's first requests on a replica since its trial began (its LoRA's first use, "
        "a cold prefix cache) count as requests and failures but are not timed for the latency guardrail.")
    check_every_s: float = Field(10.0, gt=0, description="How often the canary controller looks.")
    count_anonymous: bool = Field(False, description="Count anonymous ratings (open mode) in the arms; by default "
                                  "only authenticated raters', one per rater per answer.")

    @field_validator("steps")
    @classmethod
    def _increasing_shares(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError("steps must be increasing shares between 0 and 1, e.g. [0.05, 0.25, 0.5]")
        return steps


class RetrainSettings(BaseModel):
    """How a retrain builds its data, trains the candidate, and when the scheduler starts one."""

    method: Literal["sft", "kto"] = "sft"
    train_on: Literal["base", "quantized"] = Field(
        "base", description="Train on the unquantized base, or QLoRA-style on `model.quantized_base`."
    )
    steps: int = Field(80, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | Literal["all-linear"] = ["q_proj", "v_proj"]
    replay_fraction: float = Field(0.3, ge=0, lt=1, description="Share of the champion's own data replayed.")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Newest share of feedback held out for the gate.")
    keep_runs: int = Field(500, ge=1, description="Finished retrain runs whose record and log are kept.")
    max_feedback_rows: int = Field(
        100_000, ge=1, description="A retrain reads at most this many of the task's newest curated rows (bounded "
        "memory however long the history grows).",
    )
    min_examples: int = Field(20, ge=1, description="Fewer usable feedback examples than this: no retrain "
                              "(unless the small-data policy applies: see confirm_raters).")
    confirm_raters: int = Field(
        2, ge=2, description="Distinct authenticated raters who gave a prompt the same correction: it is `agreed` "
        "(a confirmed correction). When the hold-out is too small for significance, confirmed corrections are "
        "learned in one retrain and gated on honouring them plus golden non-regression (the small-data policy).",
    )
    min_confirmed_prompts: int = Field(
        3, ge=1, description="Small-data policy: the fewest distinct prompts with a confirmed correction it learns "
        "from; fewer is `insufficient_data` (one prompt, however often confirmed, is one piece of evidence).")
    max_well_rated: int = Field(
        50, ge=1, description="Small-data policy: the champion's newest answers rated well (>= 4 or thumbs up, one "
        "per prompt) that the candidate must still give (see gate.noninferiority_margin).")
    min_trust: Literal["reviewed", "agreed", "single", "anonymous"] = Field(
        "agreed", description="The least trust a correction needs to be trained on: `reviewed` (an admin approved "
        "it) > `agreed` (confirm_raters distinct raters) > `single` (one authenticated rater) > `anonymous`. The "
        "rest waits in `flywheel feedback review`.")
    min_rating_trust: Literal["reviewed", "agreed", "single", "anonymous"] = Field(
        "single", description="The least trust a well-rated answer needs to be learned as a target (it is the "
        "model's own answer, so one authenticated rater is the default).")
    majority: float = Field(
        0.66, gt=0.5, le=1, description="Distinct raters correcting one prompt differently: the most given "
        "correction wins only with at least this share of them; otherwise the prompt goes to review.")
    max_share_per_rater: float = Field(
        0.25, gt=0, le=1, description="Most of a retrain's new rows that one rater's verdicts alone may make up; "
        "their newest rows are kept up to it.")
    small_data_replay_per_row: int = Field(
        4, ge=0, description="Small-data policy: champion rows replayed per (weighted) confirmed correction.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="GPU share per training worker; e.g. 0.5 beside a "
                                   "serving replica with replica_gpus 0.5 on one GPU.")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    resource_wait_s: float = Field(
        300.0, ge=0, description="How long a retrain's workers may wait for free CPUs/GPUs (or for the cluster to "
        "add them) before the run fails saying what is missing.")
    early_stopping_patience: int | None = None
    corrections_max_steps: int = Field(
        160, ge=1, description="Small-data policy: the cap on steps. Training stops before it once greedy decoding "
        "gives every confirmed correction on its own prompt, or once the loss on them stopped falling for "
        "corrections_patience evaluations (one every 10 steps); the best checkpoint is kept.")
    corrections_patience: int = Field(3, ge=1)
    schedule_enabled: bool = True
    schedule_interval_s: float = Field(600.0, gt=0, description="Scheduler: at least this long between runs.")
    schedule_min_new_examples: int = Field(50, ge=1, description="Scheduler: and at least this many new rows.")
    golden_path: str | None = Field(
        None, description="JSONL of {prompt, answer, reasoning}: the task's fixed regression set (demo: built in)."
    )
    gate: GateSettings = GateSettings()


class TrainSettings(BaseModel):
    """How `flywheel train` fits a task's adapter from a user's own data.

    Fields left None take the base model's defaults (`training_defaults`): what a tiny base needs to learn
    a new task is not what a 1.5B R1-Distill needs, so those numbers belong to the base, not to code.
    Steps follow from the data: passes over it (more for a small dataset, the way hosted fine-tuning services
    pick epochs by size), ended early once the validation loss stops falling, within a step cap and a time budget.
    """

    epochs: float | None = Field(None, gt=0, description="Passes over a training split large enough to need no more.")
    min_examples_seen: int | None = Field(
        None, ge=1, description="A smaller split gets more passes, until training sees at least this many examples "
        "(up to max_epochs).")
    max_epochs: float | None = Field(None, gt=0, description="The most passes a small split gets.")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps, whatever the epochs say.")
    max_train_seconds: float | None = Field(
        None, gt=0, description="Time budget of the training loop; the best checkpoint so far is kept. None: none.")
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    lora_r: int | None = Field(None, ge=1)
    lora_alpha: int | None = Field(None, ge=1)
    lora_target_modules: list[str] | Literal["all-linear"] | None = None
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop after this many evaluations on the validation split without a lower loss."
    )
    val_size: float = Field(0.15, ge=0, description="Validation share (<1) or row count (>=1): early stopping.")
    test_size: float = Field(0.15, ge=0, description="Test share (<1) or row count (>=1): scored, becomes golden.")
    seed: int = 0
    near_duplicate_threshold: float = Field(
        0.9, gt=0, le=1, description="MinHash Jaccard similarity above which a row is a near-duplicate."
    )

    def epochs_for(self, rows: int) -> float:
        """Passes over a training split of `rows` rows: `epochs`, more for a small split (`min_examples_seen`)."""
        epochs = self.epochs or 1.0
        if self.min_examples_seen and self.min_examples_seen > epochs * rows:
            epochs = self.min_examples_seen / max(rows, 1)
            if self.max_epochs:
                epochs = max(min(epochs, self.max_epochs), self.epochs or 1.0)
        return epochs


def training_defaults(base: str) -> dict[str, Any]:
    """Training numbers that suit `base` when `train.*` leaves them unset."""
    if base == DEMO_MODEL:  # a 2-layer model: a new task needs every linear layer and hundreds of steps (README)
        return {"epochs": 12.0, "min_examples_seen": 3200, "max_epochs": 100.0, "max_steps": 600,
                "learning_rate": 2e-3, "lora_r": 32, "lora_alpha": 64, "lora_target_modules": "all-linear"}
    # a real R1-Distill base learns a task with the seeds' q/v rank-16 LoRA in a few epochs; a small set gets
    # more, until 100 examples are seen, at most 25 (the rule hosted fine-tuning services use)
    return {"epochs": 3.0, "min_examples_seen": 100, "max_epochs": 25.0, "max_steps": 2000,
            "learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_target_modules": ["q_proj", "v_proj"]}


class QuantizeSettings(BaseModel):
    """How `flywheel quantize` builds a GPTQ base, and the quality bar it must clear to be served."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="Columns sharing one scale; -1 for one group per row.")
    calibration_examples: int = Field(256, ge=8, description="Training examples used as calibration texts.")
    quality_examples: int = Field(64, ge=1, description="Held-out examples the quality check scores.")
    min_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="Refuse a base whose greedy next token agrees with the source's less often."
    )
    min_logit_cosine: float = Field(
        0.95, ge=-1, le=1, description="Refuse a base whose logits point elsewhere than the source's (mean cosine)."
    )
    cpu_workers: int | None = Field(None, ge=1, description="GPTQMODEL_CPU_WORKERS (None: the core count).")


class LoopSettings(BaseModel):
    """The loop's keeper: the Serve deployment that runs the curator, the retrain scheduler and the canary
    controller beside the gateway and the LLM replicas, so `serve deploy`, a RayService and `flywheel up`
    all run the same loop."""

    enabled: bool = Field(True, description="Run the loop inside the app. Several apps on one registry elect "
                          "one keeper (the others stand by); false: serving only.")
    lease_s: float = Field(15.0, ge=2, description="A keeper that stops renewing its lease this long (its replica "
                           "died) hands the loop to a standby keeper.")


class RaySettings(BaseModel):
    address: str | None = Field(None, description="Existing cluster address; None starts a local Ray.")
    num_cpus: int | None = Field(None, description="Logical CPUs for a local Ray (None: detect).")
    object_store_mb: int = Field(512, ge=80)
    dashboard_port: int | None = Field(
        8265, ge=1, le=65535, description="A local Ray's dashboard (on 127.0.0.1): where `flywheel retrain --address` "
        "submits retrains as Ray jobs and `serve deploy` deploys; None: no dashboard.")


class BootstrapSettings(BaseModel):
    """How `flywheel bootstrap` builds the embedded demo model and its first adapter."""

    seed: int = 0
    base_steps: int = 400
    adapter_steps: int = 60
    train_examples: int = 600


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".flywheel"), description="Where local state lives (models, registry, logs).")
    tasks: list[TaskSpec] = Field(
        default_factory=lambda: [DEMO_TASK],
        description="The tasks this platform serves (more can be added with `flywheel train` / `flywheel tasks "
        "add`). Default: the built-in demo task.",
    )
    admin_token: SecretStr = Field(SecretStr(""), description="The bootstrap admin key: every scope, for /admin "
                                   "routes and first `flywheel keys` setup; empty: only keys with scope admin. Set it "
                                   "with FLYWHEEL_ADMIN_TOKEN rather than in a file.")
    auth: AuthSettings = AuthSettings()
    model: ModelSettings = ModelSettings()
    registry: RegistrySettings = RegistrySettings()
    serving: ServingSettings = ServingSettings()
    vllm: VLLMSettings = VLLMSettings()
    ray: RaySettings = RaySettings()
    feedback: FeedbackSettings = FeedbackSettings()
    retrain: RetrainSettings = RetrainSettings()
    canary: CanarySettings = CanarySettings()
    loop: LoopSettings = LoopSettings()
    train: TrainSettings = TrainSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    quantize: QuantizeSettings = QuantizeSettings()

    _config_file: ClassVar[Path | None] = None  # set by load_settings for one construction

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Ray workers run in other directories: pin the path before it travels.
        return home.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = cls._config_file or os.environ.get("FLYWHEEL_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if handed_down := os.environ.get(SHARED_SETTINGS_ENV):
            sources.append(InitSettingsSource(settings_cls, init_kwargs=json.loads(handed_down)))
        sources.append(env_settings)
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks: each name once ({', '.join(sorted(names))})")
        return tasks

    def shareable(self) -> dict[str, Any]:
        """These settings as JSON-ready data without the secrets: what may travel in arguments or files."""
        return self.model_dump(mode="json", exclude={"admin_token": True, "feedback": {"sasl_password"}})

    def secret_env(self) -> dict[str, str]:
        """The secrets as the environment variables another process reads them from."""
        secrets = {ADMIN_TOKEN_ENV: self.admin_token, SASL_PASSWORD_ENV: self.feedback.sasl_password}
        return {name: value for name, secret in secrets.items() if secret and (value := secret.get_secret_value())}

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must run with exactly these settings."""
        return {**os.environ, SHARED_SETTINGS_ENV: json.dumps(self.shareable()), **self.secret_env()}

    @classmethod
    def from_shared(cls, shared: dict[str, Any]) -> Settings:
        """Rebuild settings from `shareable()` data, the secrets read from this process's environment."""
        secrets = {"admin_token": os.environ.get(ADMIN_TOKEN_ENV, ""),
                   "feedback": {**shared.get("feedback", {}), "sasl_password": os.environ.get(SASL_PASSWORD_ENV)}}
        return cls.model_validate({**shared, **secrets})

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Settings:
        if self.auth.mode == "open" and not is_loopback(self.serving.host):
            raise ValueError(f"auth.mode open serves without keys: only on loopback, not on {self.serving.host}")
        return self

    @property
    def auth_mode(self) -> Literal["keys", "open"]:
        """`auth.mode` with `auto` decided: open only where nobody but this box can connect."""
        if self.auth.mode == "auto":
            return "open" if is_loopback(self.serving.host) else "keys"
        return self.auth.mode

    @property
    def default_task(self) -> str:
        """The task of a request that names none, and of commands given no --task."""
        if self.model.task:
            return self.model.task
        return self.tasks[0].name if self.tasks else DEMO_TASK.name

    def training(self) -> TrainSettings:
        """`train` with every unset field filled from the base's defaults."""
        filled = {k: v for k, v in training_defaults(self.model.base).items() if getattr(self.train, k) is None}
        return self.train.model_copy(update=filled)

    @property
    def registry_uri(self) -> str:
        return self.registry.uri or str(self.home / "registry")

    @property
    def demo_base_dir(self) -> Path:
        return self.home / "models" / "demo-base"

    @property
    def feedback_dir(self) -> Path:
        """Local log, spool, curator state, reviews and (by default) the curated dataset live under here."""
        return self.home / "feedback"

    @property
    def dataset_uri(self) -> str:
        """Where the curated dataset lives (`feedback.dataset_uri`): a local path or an fsspec URL."""
        return self.feedback.dataset_uri or str(self.feedback_dir / "dataset")

    @property
    def base_model_path(self) -> str:
        """What the engines load: the demo model's directory, or the configured dir / hub id."""
        return str(self.demo_base_dir) if self.model.base == DEMO_MODEL else self.model.base


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `config_file` (else FLYWHEEL_CONFIG), FLYWHEEL_* env and `overrides`."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    Settings._config_file = config_file
    try:
        return Settings(**overrides)
    finally:
        Settings._config_file = None
