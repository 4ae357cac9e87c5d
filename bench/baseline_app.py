"""What users write today: FastAPI + ProcessPoolExecutor via run_in_executor, with or
without asyncio.wait_for. The load generator drives it exactly like Timebox.

    uvicorn bench.baseline_app:app --port 8100      (BASELINE_WAIT_FOR=2 for wait_for)
"""

import asyncio
import os
import time
from concurrent.futures import ProcessPoolExecutor

from fastapi import FastAPI, HTTPException

app = FastAPI()
pool = ProcessPoolExecutor(max_workers=int(os.environ.get("BASELINE_WORKERS", "2")))
WAIT_FOR = float(os.environ.get("BASELINE_WAIT_FOR", "0"))  # 0: plain await


def burn(seconds: float) -> float:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start


@app.post("/burn")
async def burn_endpoint(seconds: float) -> dict[str, float]:
    future = asyncio.get_running_loop().run_in_executor(pool, burn, seconds)
    try:
        cpu = await (asyncio.wait_for(future, WAIT_FOR) if WAIT_FOR else future)
    except TimeoutError:
        raise HTTPException(504, "timed out") from None
    return {"cpu_seconds": cpu}


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
