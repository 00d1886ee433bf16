from setuptools import find_packages, setup

setup(
    name="c2s_d2",
    version="0.1.0",
    description="CLIP-to-Seg distillation for zero-shot semantic segmentation, on Detectron2",
    python_requires=">=3.10",
    packages=find_packages(include=["c2s_d2", "c2s_d2.*"]),
    package_data={"c2s_d2": ["modeling/clip/model_configs/*.json", "modeling/clip/weights/*.pt", "modeling/clip/*.txt", "data/datasets/*.json", "data/*.txt", "data/*.json"]},
    install_requires=[
        "torch",
        "torchvision",
        "fvcore",
        "iopath",
        "open_clip_torch",
        "pycocotools",
        "numpy<2",
        "opencv-python-headless",
        "scipy",
    ],
    # detectron2 is not on the index under its own name; see README "Installation".
    extras_require={"d2wheel": ["sal-detectron2==0.7.2"], "dev": ["pytest"]},
)
