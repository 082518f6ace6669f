"""Jobs over datasets beyond memory and beyond one machine.

`invert_stream` inverts a dataset chunk by chunk into a results folder,
resumably, in this process, on a Dask cluster (`dask_client`) or on any
``concurrent.futures.Executor``; `load_results` reads the folder back as one
`InversionResult`, `ResultsFolder.read_field` one field of it.

    >>> from preimage.jobs import dask_client, invert_stream, load_results
    >>> with dask_client(workers=2) as client:
    ...     report = invert_stream(net, "x.npy", "results", executor=client)
    >>> result = load_results("results")
"""

from preimage.jobs.cluster import dask_client
from preimage.jobs.store import ResultsFolder, load_results
from preimage.jobs.stream import JobReport, invert_stream

__all__ = ["JobReport", "ResultsFolder", "dask_client", "invert_stream", "load_results"]
