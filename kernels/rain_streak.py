"""Rain family "streak", the authors' generator: the renderers of ``kernels.streak`` as one ``RainFamily``.

How the rain is made and computed: ``kernels.streak`` (package docstring). The CPU renderer fuses compositing and
channel planes per patch, while the patch's rain layer is in cache.
"""
from __future__ import annotations

from kernels.renderer import RainFamily
from kernels.streak import cpu, gpu, reference

#: The streak family's renderers.
FAMILY = RainFamily("streak", cpu.render_cpu, gpu.render_gpu, reference.render_reference, cpu.render_composite_cpu,
                    cpu.render_finish_cpu)
