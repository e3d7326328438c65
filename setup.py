"""fasttrdpo: fused kernels for TR-DPO (DPO with a moving reference model).

`kernels/` (pure Triton, one concern per file) is shipped as the subpackage `fasttrdpo.kernels`;
`csrc/` (C++ sources built on demand) as the package data of `fasttrdpo.csrc`. Nothing installs a
top-level module named `kernels` (that name belongs to another PyPI package).
"""
from setuptools import setup, find_packages

packages = find_packages(include=["fasttrdpo", "fasttrdpo.*"]) + ["fasttrdpo.kernels", "fasttrdpo.csrc"]

setup(
    name="fasttrdpo",
    version="0.1.0",
    description="Fused Triton/C++ kernels for TR-DPO: paired policy+reference log-probs and reference blending",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fasttrdpo.kernels": "kernels", "fasttrdpo.csrc": "csrc"},
    package_data={"fasttrdpo.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",  # the Triton interpreter imports it; neither torch nor triton declares it
        "transformers>=4.53",  # packing: every supported family takes position ids + a custom 4-D mask (4.46: GPT-2 does not)
        "datasets>=3.0",
        "tqdm",
        "ninja",  # torch.utils.cpp_extension builds the C++ CPU kernels (csrc/) with it, on demand
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "trl==1.16.0", "liger-kernel", "matplotlib", "peft",
                 # the sharded-training tests (FSDP2 needs only torch; ZeRO-3 runs on CPU with gloo) and logging
                 "deepspeed==0.19.8; platform_system == 'Linux'", "tensorboard", "wandb"],
        "plot": ["matplotlib"],
        "lora": ["peft"],
        "deepspeed": ["deepspeed"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "flash": ["flash-attn"],  # CUDA machines only: a source distribution that needs nvcc
    },
    entry_points={"console_scripts": ["fasttrdpo=fasttrdpo.cli:main"]},
)
