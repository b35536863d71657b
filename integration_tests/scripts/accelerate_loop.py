"""accelerate_stock_loop.py with hf_zero's explicit line before ``accelerator.prepare``:

```python
model, optimizer = hf_zero.prepare_accelerate(accelerator, model, optimizer)   # the added line
```

``--plain`` skips it: run in one process, it is the reference. Under ``hf-zero launch`` the
patched ``Accelerator.prepare`` then finds the model already sharded (calling both is harmless).
"""

import os
import sys

import hf_zero

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerate_stock_loop import main  # noqa: E402

if __name__ == "__main__":
    main(before_prepare=hf_zero.prepare_accelerate)
