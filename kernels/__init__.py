"""fasttrdpo's Triton kernels, shipped as the subpackage `fasttrdpo.kernels` (setup.py maps this folder).

Run from a checkout, the repository root is on sys.path (`python -m ...` and `python -c ...` put the working
directory first), so `import kernels` would find this folder instead of the PyPI package of that name
(Hugging Face's hub kernels, which transformers >= 5.25 requires and imports when it loads a model class).
Imported under that top-level name, this file hands the name over to that package when one is installed;
as `fasttrdpo.kernels` it does nothing.
"""
if __name__ == "kernels":
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.abspath(__file__))
        for entry in sys.path:
            spec = importlib.machinery.PathFinder.find_spec("kernels", [entry or os.getcwd()])
            if spec is None or spec.origin is None or spec.loader is None:
                continue
            if os.path.dirname(os.path.abspath(spec.origin)) == here:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules["kernels"] = module  # the import that reached this file returns sys.modules["kernels"]
            spec.loader.exec_module(module)
            return

    _hand_over()
    del _hand_over
