"""c2s_d2 package.

Installation (detectron2 is not on PyPI under its own name, so it comes through an extra):

* Python 3.10 on Linux x86-64: ``pip install -e .[d2wheel]`` installs everything, detectron2
  through ``sal-detectron2==0.7.2``, a registry build of detectron2 (its Python package is
  ``detectron2``; the wheel exists for CPython 3.10 only).
* Any other Python, or a CUDA build: build detectron2 from source first
  (``pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'``,
  after torch), then ``pip install -e .``.

``import c2s_d2`` without detectron2 raises an ImportError that says the same.
"""

from setuptools import find_packages, setup

LONG_DESCRIPTION = """\
CLIP-to-Seg (C2S) distillation for zero-shot semantic segmentation, on Detectron2.

Install:

    # Python 3.10, Linux x86-64: detectron2 comes from the sal-detectron2 wheel
    pip install -e .[d2wheel]

    # any other Python / a CUDA build: build detectron2 from source first, then
    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
    pip install -e .
"""

setup(
    name="c2s_d2",
    version="0.1.0",
    description="CLIP-to-Seg distillation for zero-shot semantic segmentation, on Detectron2",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # the LICENSE file's text
    python_requires=">=3.10",
    packages=find_packages(include=["c2s_d2", "c2s_d2.*"]),
    package_data={
        "c2s_d2": [
            "modeling/clip/model_configs/*.json",
            "modeling/clip/weights/*.pt",
            "modeling/clip/*.txt",
            "data/datasets/*.json",
            "data/*.txt",  # imagenet_classes.txt: the default latent vocabulary
            "data/*.json",  # latent_vocabulary_synonyms.json
        ]
    },
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "iopath",
        # detectron2.model_zoo imports pkg_resources, which setuptools 81 removes
        "setuptools<81",
        "open_clip_torch",
        "pycocotools",
        "numpy<2",
        "opencv-python-headless",
        "scipy",
        "Pillow",
        "tabulate",
        "tqdm",
    ],
    # detectron2 itself is not on the index under its own name: `pip install -e .[d2wheel]`
    # (Python 3.10, Linux x86-64) installs the sal-detectron2 build of it; elsewhere build
    # detectron2 from source before `pip install -e .` (see the module docstring above).
    extras_require={"d2wheel": ["sal-detectron2==0.7.2"], "dev": ["pytest"]},
)
