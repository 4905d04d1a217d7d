"""Build of attn: the Python package and the Cython CPU kernels.

The kernels in cpu/_kernels.pyx are compiled once per x86-64 ISA level and installed
as attn.cpu._kernels_<isa>; attn.cpu loads the best one the running CPU supports, so
the default build is portable (no -march=native) yet uses AVX-512 where it exists.

Environment variables:
  ATTN_NO_OPENMP=1   build without OpenMP (kernels run on one thread).
  ATTN_NATIVE=1      also build a -march=native variant (preferred at run time on the
                     build machine; not portable to other CPUs).
  ATTN_ISAS=a,b      restrict the ISA variants built (generic, avx2, avx512).
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler_accepts(compiler_cmd, flags, source, link=True):
    """Compile (and link) a tiny program with the given flags; True if it works."""
    tmp = tempfile.mkdtemp(prefix="attn-probe-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        out = os.path.join(tmp, "probe")
        cmd = list(compiler_cmd) + flags + [src, "-o", out]
        if not link:
            cmd.insert(len(compiler_cmd), "-c")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return res.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _isa_flags():
    """ISA variants to build: name -> extra compile flags."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        variants = {
            "generic": [],
            "avx2": ["-march=x86-64-v3"],
            "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
        }
    else:
        variants = {"generic": []}
    wanted = os.environ.get("ATTN_ISAS")
    if wanted:
        names = [w.strip() for w in wanted.split(",") if w.strip()]
        unknown = [n for n in names if n not in variants]
        if unknown:
            raise SystemExit(
                f"ATTN_ISAS: unknown variant(s) {unknown}; available on {machine}: "
                f"{sorted(variants)}"
            )
        variants = {n: variants[n] for n in names}
    if _truthy("ATTN_NATIVE"):
        variants["native"] = ["-march=native"]
    return variants


class BuildExt(build_ext):
    """Probes the compiler for OpenMP and each ISA variant before compiling."""

    def build_extensions(self):
        cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
        use_openmp = not _truthy("ATTN_NO_OPENMP")
        if use_openmp and not _compiler_accepts(cc, ["-fopenmp"], OPENMP_PROBE):
            use_openmp = False
            bar = "!" * 78
            sys.stderr.write(
                f"\n{bar}\n"
                "attn: the C compiler does not support OpenMP (-fopenmp failed).\n"
                "attn: building the CPU kernels SERIAL: they will use ONE thread.\n"
                "attn: install an OpenMP-capable compiler (gcc, or clang with libomp)\n"
                "attn: and reinstall for multi-threaded kernels.\n"
                f"{bar}\n\n"
            )
        elif not use_openmp:
            sys.stderr.write("attn: ATTN_NO_OPENMP set: building the CPU kernels serial.\n")
        kept = []
        for ext in self.extensions:
            isa_flags = ext.attn_isa_flags
            if isa_flags and not _compiler_accepts(cc, isa_flags, "int main(void){return 0;}\n"):
                sys.stderr.write(
                    f"attn: compiler rejects {isa_flags}: skipping {ext.name}\n"
                )
                continue
            ext.extra_compile_args = (
                ["-O3", "-fno-math-errno", "-Wno-unused-function"]
                + isa_flags
                + (["-fopenmp"] if use_openmp else [])
            )
            ext.extra_link_args = ["-fopenmp"] if use_openmp else []
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()
        if self.inplace:
            self._remove_stale_variants({ext.name.rsplit(".", 1)[1] for ext in kept})

    def _remove_stale_variants(self, built):
        """An in-place (editable) build must not leave a variant from an earlier build
        beside the new ones: attn.cpu prefers 'native', and a stale one would run old
        code."""
        import glob

        for path in glob.glob(os.path.join(ROOT, "cpu", "_kernels_*.*")):
            name = os.path.basename(path).split(".", 1)[0]
            if path.endswith((".so", ".pyd")) and name not in built:
                os.remove(path)
                sys.stderr.write(f"attn: removed stale kernel variant {path}\n")


def _extensions():
    from Cython.Build import cythonize

    exts = []
    for isa, flags in _isa_flags().items():
        ext = Extension(
            f"attn.cpu._kernels_{isa}",
            sources=["cpu/_kernels.pyx"],
            include_dirs=["cpu/include"],
            depends=["cpu/include/tile_ops.h"],
        )
        # Each variant is cythonized into its own folder: the generated C differs
        # only in the module name, but two modules cannot share one .c file.
        (ext,) = cythonize(
            [ext],
            build_dir=os.path.join("build", f"cython-{isa}"),
            compiler_directives={"language_level": 3},
            quiet=True,
        )
        ext.attn_isa_flags = flags
        exts.append(ext)
    return exts


setup(
    package_dir={"attn": "attn", "attn.cpu": "cpu", "attn.gpu": "gpu"},
    packages=["attn", "attn.cpu", "attn.gpu"],
    package_data={"attn.cpu": ["*.pyx", "include/*.h"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
)
