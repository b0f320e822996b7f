"""The GPU targets the report compiles for, with the peak figures its model uses (dense, no sparsity;
vendor datasheets), and the one switch that makes the launchers pick a target's configs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str  # "sm90"
    arch: int  # 90: what triton.compile's GPUTarget and the launchers' config tables take
    gpu: str  # the GPU whose peaks the estimate uses
    sms: int
    clock_ghz: float
    tflops: dict[str, float]  # dot precision -> peak TFLOP/s
    hbm_tbs: tuple[float, ...]  # bandwidths of the target's GPUs (H100, H200)
    smem_per_sm: int = 228 * 1024
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


# H100 SXM: 132 SMs x 1.83 GHz; bf16 989 TFLOP/s, tf32 495, fp32 FMA 67; HBM3 3.35 TB/s (H200: 4.8).
# A100 SXM: 108 SMs x 1.41 GHz; bf16 312, tf32 156, fp32 19.5; 2.04 TB/s; 164 KB shared per SM.
# B200: 148 SMs x 1.965 GHz; bf16 2,250, tf32 1,100, fp32 75; HBM3e 8 TB/s. The triton wheel's ptxas
# compiles sm_100 (tcgen05 MMAs, UTCHMMA in SASS): rows for the record, no sm_100 config list of its
# own yet (the launchers give it sm_90's).
TARGETS = {
    "sm90": Target(
        "sm90",
        90,
        "H100/H200 SXM",
        132,
        1.83,
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "3xtf32": 494.7 / 3, "ieee": 66.9},
        (3.35, 4.8),
    ),
    "sm80": Target(
        "sm80",
        80,
        "A100 SXM 80GB",
        108,
        1.41,
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "3xtf32": 52.0, "ieee": 19.5},
        (2.04,),
        smem_per_sm=164 * 1024,
    ),
    "sm100": Target(
        "sm100",
        100,
        "B200",
        148,
        1.965,
        {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "3xtf32": 1100.0 / 3, "ieee": 75.0},
        (8.0,),
    ),
}
