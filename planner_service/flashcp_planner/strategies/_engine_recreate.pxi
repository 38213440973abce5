# Included by _engine.pyx: the small-instance ruin-and-recreate search
# (strategies/recreate.py's ruin_recreate and _recreate), on a run's Sums.

cdef struct Candidate:
    double key
    double inc
    i64 g0
    i64 k
    double work
    Py_ssize_t option  # index in the document's split table; -1: whole on g0


cdef inline bint _candidate_before(Candidate* a, Candidate* b) noexcept:
    """Python's order of the reference's ``(key, inc, (g0, k), work)`` tuples."""
    if a.key != b.key:
        return a.key < b.key
    if a.inc != b.inc:
        return a.inc < b.inc
    if a.g0 != b.g0:
        return a.g0 < b.g0
    if a.k != b.k:
        return a.k < b.k
    return a.work < b.work


cdef int _lns(Engine e, Sums sums, list placement, list touch, Py_ssize_t nodes, Py_ssize_t lns_ranks,
              Py_ssize_t lns_nodes) except -1:
    """:func:`flashcp_planner.strategies.recreate.ruin_recreate` (``lns_ranks``, ``lns_nodes``: its
    constants) on ``sums`` (updated in place), ``placement`` and ``touch``, operation for operation."""
    search = e.search
    cdef Py_ssize_t n = search.n, left = nodes, m, x, used
    cdef i64 r
    cdef double bound, best
    cdef bint improved = True
    cdef dict tables = {}, blocks = {}
    lengths = search.lengths
    while improved and left > 0:
        improved = False
        r = 0
        best = sums.total(0)
        for x in range(1, n):
            if sums.total(x) > best:
                r, best = x, sums.total(x)
        bound = best * (1.0 - 1e-9)
        if all(placement[d][1] == 0 for d in touch[r]):
            return 0  # only pieces of fill-cut documents: nothing to re-place
        totals = [sums.total(x) for x in range(n)]
        others = sorted((x for x in range(n) if x != r), key=lambda x: (totals[x], x))
        tried = set()
        for m in range(1, min(lns_ranks, n - 1) + 1):
            for subset in combinations(others, m):
                freed = tuple(sorted({d for t in (r, *subset) for d in touch[t] if placement[d][1] != 0},
                                     key=lambda d: (-lengths[d], d)))
                if freed in tried:  # the same documents as an earlier set: the same search
                    continue
                tried.add(freed)
                _fill_tables(e, freed, tables, blocks)
                for d in freed:
                    _move_shares(sums, touch, d, e._shares(d, placement[d][0], placement[d][1], e.whole_a), -1)
                for best_fit in (False, True):
                    found, used = _recreate(search, sums, freed, bound, min(lns_nodes, left), best_fit, tables,
                                            blocks)
                    left -= used
                    if found is not None:
                        for d, option in zip(freed, found):
                            placement[d] = option
                        improved = True
                        break
                    if left <= 0:
                        break
                for d in freed:
                    _move_shares(sums, touch, d, e._shares(d, placement[d][0], placement[d][1], e.whole_a), 1)
                if improved or left <= 0:
                    break
            if improved or left <= 0:
                break
    return 0


cdef int _fill_tables(Engine e, tuple docs, dict tables, dict blocks) except -1:
    """``recreate._fill_tables`` from the engine's shares; ``blocks[d]``: the split shares of each entry."""
    cdef Py_ssize_t i, ki
    cdef i64 d, g0, k
    cdef double least
    cdef Block b
    for d in docs:
        if d in tables:
            continue
        splits = []
        split_blocks = []
        for ki in range(e.num_ks):
            k = e.ks[ki]
            g0 = 0
            while g0 < e.n:
                b = e._shares(d, g0, k, e.whole_a)
                splits.append(((g0, k), None, math.fsum([b.tok[i] * e.lin + b.attn[i] for i in range(b.m)])))
                split_blocks.append(b)
                g0 += k
        least = e.lengths[d] * e.lin + e.whole_ms[d]
        for split in splits:
            least = min(least, split[2])
        tables[d] = (least, splits)
        blocks[d] = split_blocks
    return 0


cdef void _move_shares(Sums sums, list touch, i64 d, Block b, i64 sign):
    """``PlacementSearch.place`` (sign 1) / ``unplace`` (sign -1) on the sums."""
    cdef Py_ssize_t i
    sums.add(b, sign)
    for i in range(b.m):
        if sign > 0:
            (<set> touch[b.rank[i]]).add(d)
        else:
            (<set> touch[b.rank[i]]).discard(d)


cdef tuple _recreate(search, Sums sums, tuple docs, double bound, Py_ssize_t nodes, bint best_fit, dict tables,
                     dict blocks):
    """:func:`flashcp_planner.strategies.recreate._recreate` on ``sums`` (``tables`` filled for ``docs``;
    ``blocks``: their split shares as :class:`Block`), operation for operation."""
    cdef Py_ssize_t n = search.n, depth, num_docs = len(docs), i, j, count, g0, q, num_seen
    cdef i64 d, length, capacity = search.capacity, gpn = search.cm.gpus_per_node, r
    cdef double lin = search.cm.linear_ms_per_token, area = n * bound, work, room, whole_work, t, w, worst, inc
    cdef Block b
    cdef bint fits
    cdef Py_ssize_t used = 1
    lengths, whole_ms = search.lengths, search.whole_ms
    cdef double[::1] rest = np.zeros(num_docs + 1)  # least work of docs[i:]
    for i in range(num_docs - 1, -1, -1):
        rest[i] = rest[i + 1] + <double> tables[docs[i]][0]
    cdef double[::1] totals = np.empty(n)
    for i in range(n):
        totals[i] = sums.total(i)
    work = sum(np.asarray(sums.tok).tolist()) * lin + math.fsum(np.asarray(sums.attn).tolist())
    cdef Py_ssize_t width = n + sum(len(tables[d][1]) for d in docs)  # children of one node, at most
    cdef Candidate* kids = <Candidate*> malloc(max(num_docs * width, 1) * sizeof(Candidate))
    cdef Py_ssize_t* num_kids = <Py_ssize_t*> malloc((num_docs + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t* next_kid = <Py_ssize_t*> malloc((num_docs + 1) * sizeof(Py_ssize_t))
    cdef list chosen = []  # per depth: (Block, work)
    cdef double* seen_tok = <double*> malloc(max(n, 1) * sizeof(double))
    cdef double* seen_attn = <double*> malloc(max(n, 1) * sizeof(double))
    cdef i64* seen_node = <i64*> malloc(max(n, 1) * sizeof(i64))
    cdef Candidate cand
    cdef Candidate* out
    if kids == NULL or num_kids == NULL or next_kid == NULL or seen_tok == NULL or seen_attn == NULL \
            or seen_node == NULL:
        free(kids); free(num_kids); free(next_kid); free(seen_tok); free(seen_attn); free(seen_node)
        raise MemoryError()
    found = None
    try:
        depth = 0  # children(depth) of the node reached by the chosen prefix
        while True:
            # -- children(depth) ------------------------------------------------------------------------
            d = docs[depth]
            length = lengths[d]
            w = whole_ms[d]
            room = area - work - rest[depth + 1]
            out = kids + depth * width
            count = 0
            whole_work = length * lin + w
            if whole_work < room:
                num_seen = 0
                for g0 in range(n):
                    if sums.tok[g0] + length > capacity:
                        continue
                    if not (sums.ri[g0] or sums.rx[g0] or sums.si[g0] or sums.sx[g0]):
                        for q in range(num_seen):
                            if seen_tok[q] == <double> sums.tok[g0] and seen_attn[q] == sums.attn[g0] \
                                    and seen_node[q] == g0 // gpn:
                                break
                        else:
                            q = -1
                        if q >= 0:
                            continue
                        seen_tok[num_seen] = <double> sums.tok[g0]
                        seen_attn[num_seen] = sums.attn[g0]
                        seen_node[num_seen] = g0 // gpn
                        num_seen += 1
                        t = (sums.tok[g0] + length) * lin + (sums.attn[g0] + w)
                    else:
                        t = sums.time(sums.tok[g0] + length, sums.attn[g0] + w, sums.local[g0] + w, sums.ri[g0],
                                      sums.rx[g0], sums.si[g0], sums.sx[g0])
                    if t < bound:
                        out[count].key = -t if best_fit else t
                        out[count].inc = t - totals[g0]
                        out[count].g0 = g0
                        out[count].k = 1
                        out[count].work = whole_work
                        out[count].option = -1
                        count += 1
            splits = tables[d][1]
            split_blocks = blocks[d]
            for j in range(len(splits)):
                option, _, option_work = splits[j]
                if <double> option_work >= room:
                    continue
                b = <Block> split_blocks[j]
                worst = 0.0
                inc = 0.0
                fits = True
                for i in range(b.m):
                    r = b.rank[i]
                    if sums.tok[r] + b.tok[i] > capacity:
                        fits = False
                        break
                    t = sums.time(sums.tok[r] + b.tok[i], sums.attn[r] + b.attn[i], sums.local[r] + b.local[i],
                                  sums.ri[r] + b.ri[i], sums.rx[r] + b.rx[i], sums.si[r] + b.si[i],
                                  sums.sx[r] + b.sx[i])
                    if t >= bound:
                        fits = False
                        break
                    inc += t - totals[r]
                    if t > worst:
                        worst = t
                if fits:
                    out[count].key = -worst if best_fit else worst
                    out[count].inc = inc
                    out[count].g0 = option[0]
                    out[count].k = option[1]
                    out[count].work = option_work
                    out[count].option = j
                    count += 1
            for i in range(1, count):  # insertion sort: out.sort()
                cand = out[i]
                q = i
                while q > 0 and _candidate_before(&cand, &out[q - 1]):
                    out[q] = out[q - 1]
                    q -= 1
                out[q] = cand
            num_kids[depth] = count
            next_kid[depth] = 0
            # -- descend: the next child of the deepest node with one left, undoing siblings -------------
            while True:
                if len(chosen) == depth + 1:  # undo the previous sibling
                    b, option_work = chosen.pop()
                    sums.add(b, -1)
                    work -= <double> option_work
                    for i in range(b.m):
                        totals[b.rank[i]] = sums.total(b.rank[i])
                if next_kid[depth] < num_kids[depth]:
                    break
                if depth == 0:
                    break
                depth -= 1
            if next_kid[depth] >= num_kids[depth]:
                break  # the whole tree is searched
            cand = kids[depth * width + next_kid[depth]]
            next_kid[depth] += 1
            d = docs[depth]
            if cand.option < 0:
                b = Block(1)
                b.rank[0] = cand.g0
                b.tok[0] = lengths[d]
                b.attn[0] = whole_ms[d]
                b.local[0] = whole_ms[d]
                b.ri[0] = b.rx[0] = b.si[0] = b.sx[0] = 0
            else:
                b = <Block> blocks[d][cand.option]
            sums.add(b, 1)
            work += cand.work
            for i in range(b.m):
                totals[b.rank[i]] = sums.total(b.rank[i])
            chosen.append((b, cand.work))
            if len(chosen) == num_docs:
                found = []
                for i in range(num_docs):
                    # (the options of the chosen path, read back from the candidate arrays)
                    cand = kids[i * width + next_kid[i] - 1]
                    found.append((cand.g0, cand.k))
                break
            if used >= nodes:
                break
            used += 1
            depth += 1
        for b, _ in chosen:
            sums.add(b, -1)
        return found, used
    finally:
        free(kids); free(num_kids); free(next_kid); free(seen_tok); free(seen_attn); free(seen_node)
