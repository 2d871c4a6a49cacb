// Golden mode's greedy loop: lossless speculative decoding with a low-bit draft and a reference verifier.
//
// The draft proposes k tokens one at a time; the verifier scores all of them in one pass on its KV cache; the
// longest prefix on which the verifier's own greedy choice agrees is kept, followed by the verifier's token at
// the first disagreement (or after the last proposal). Both caches are then cut back to the tokens kept. The
// output is therefore exactly the verifier's greedy decoding, whatever the draft proposes.
//
// Independent of TensorRT: a Model is anything with
//   std::vector<int64_t> forward(std::vector<int64_t> const& tokens)  // append tokens to the cache; return the
//                                                                     // greedy next token after each of them
//   int64_t length() const                                            // tokens in the cache
//   void truncate(int64_t length)                                     // keep the first `length` tokens
#pragma once

#include <algorithm>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <vector>

namespace accullm
{

struct GoldenStats
{
    int64_t verifierPasses{0};  // passes of the verifier after the prompt
    int64_t proposed{0};        // draft tokens the verifier scored
    int64_t accepted{0};        // of those, the ones it kept

    double acceptanceRate() const { return proposed ? static_cast<double>(accepted) / proposed : 0.0; }
};

// The first `maxNewTokens` tokens of the verifier's greedy continuation of `prompt` (through the first token
// in `eos`, if one comes first), drafting `draftTokens` tokens per verifier pass.
template <class Draft, class Verifier>
std::vector<int64_t> goldenGreedy(Draft& draft, Verifier& verifier, std::vector<int64_t> const& prompt,
    int64_t maxNewTokens, int64_t draftTokens, std::set<int64_t> const& eos, GoldenStats* stats = nullptr)
{
    if (prompt.empty())
        throw std::invalid_argument("golden mode needs a non-empty prompt");
    if (draftTokens < 1)
        throw std::invalid_argument("golden mode drafts at least one token per verifier pass");
    GoldenStats local;
    GoldenStats& counts = stats ? *stats : local;
    std::vector<int64_t> output;
    if (maxNewTokens < 1)
        return output;
    int64_t next = verifier.forward(prompt).back();  // the verifier's own first token
    std::vector<int64_t> pending = prompt;           // tokens the draft has not read yet
    output.push_back(next);
    while (static_cast<int64_t>(output.size()) < maxNewTokens && !eos.count(next))
    {
        int64_t const kept = verifier.length();  // the verifier's cache: prompt and every output but `next`
        int64_t const count = std::min(draftTokens, maxNewTokens - static_cast<int64_t>(output.size()));
        std::vector<int64_t> proposals;
        pending.push_back(next);
        for (int64_t i = 0; i < count; ++i)
        {
            proposals.push_back(draft.forward(pending).back());
            pending = {proposals.back()};
        }
        std::vector<int64_t> scored{next};
        scored.insert(scored.end(), proposals.begin(), proposals.end());
        std::vector<int64_t> const choices = verifier.forward(scored);  // choices[i]: after scored[0..i]
        ++counts.verifierPasses;
        counts.proposed += count;
        int64_t agreed = 0;
        while (agreed < count && proposals[agreed] == choices[agreed])
            ++agreed;
        counts.accepted += agreed;
        // keep `next` and the agreed proposals in both caches; the verifier's token after them comes next
        verifier.truncate(kept + 1 + agreed);
        int64_t const draftKeeps = std::min(draft.length(), kept + 1 + agreed);
        draft.truncate(draftKeeps);
        pending.assign(proposals.begin() + (draftKeeps - kept - 1), proposals.begin() + agreed);
        bool stopped = false;
        for (int64_t i = 0; i <= agreed && !stopped; ++i)
        {
            int64_t const token = i < agreed ? proposals[i] : choices[agreed];
            output.push_back(token);
            stopped = eos.count(token) > 0 || static_cast<int64_t>(output.size()) >= maxNewTokens;
            if (stopped && i < agreed)
                return output;  // an agreed proposal ended the text: nothing after it is decoded
        }
        next = choices[agreed];
        if (stopped)
            break;
    }
    return output;
}

} // namespace accullm
