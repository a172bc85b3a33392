"""python -m snpemu.psp"""

from snpemu.psp import SPEC
from snpemu.runtime.server import run_service

if __name__ == "__main__":
    run_service(SPEC)
