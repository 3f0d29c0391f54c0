"""megatron_lite: train a small LLM from scratch on DeepSpeed, from raw text to a HF chat model."""
from setuptools import find_packages, setup

# torch is deliberately unpinned-but-bounded: CI installs the CPU build (torch==2.13.0) first,
# and any version in this range then satisfies the requirement without pulling a CUDA wheel.
install_requires = [
    "torch>=2.4,<2.15",
    "deepspeed>=0.16",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "transformers>=4.56",
    "safetensors>=0.4",
    "datasets>=3.0",
    "numpy>=1.24",
    "wandb>=0.18",
    "tqdm>=4.66",
    "peft>=0.13",  # LoRA adapters for SFT (wraps our nn.Linear layers)
    "matplotlib>=3.8",
]

extras_require = {
    "gpu": ["flash-attn>=2.6"],
    "app": ["streamlit>=1.40"],
    "serve": ["fastapi>=0.110", "uvicorn>=0.30"],
    # lm-eval's `--model hf` needs accelerate; both accept the CPU torch already installed (no CUDA wheel).
    "eval": ["lm-eval>=0.4.13", "accelerate>=1.0"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "megatron-core>=0.12", "openai>=1.40", "streamlit>=1.40",
            "fastapi>=0.110", "uvicorn>=0.30", "lm-eval>=0.4.13", "accelerate>=1.0", "selenium>=4.20", "trl>=0.20"],
}

setup(
    name="megatron_lite",
    version="0.1.0",
    description="Train a small LLM (dense or MoE) from scratch on DeepSpeed with Megatron-style parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    # lm-eval reads the local task YAMLs (and the loader module they name) from the installed package.
    package_data={"megatron_lite.eval": ["tasks/*.yaml", "tasks/*.py"]},
    install_requires=install_requires,
    extras_require=extras_require,
)
